"""Frozen baseline: ray_apps/scheduler/policy.py of commit e2c6174, vendored unchanged below this line.

Scheduling policy: pure functions over plain data, no I/O, no clock.

`plan()` decides, for one dispatcher cycle, which queued jobs to admit and which
running jobs to preempt, given the free resources of each node. Rules:

- Order: effective priority = class rank + seconds waited / `aging_s` (so a low
  class cannot starve forever), then submission time, then id.
- Gang admission: a job is admitted only if all its workers fit the free
  resources at once (first-fit over nodes, largest workers first).
- FIFO within a class: once a job of a class does not fit, later jobs of that
  class wait behind it; jobs of other classes may still use what is free.
- Quotas: a tenant's running + admitted CPUs and GPUs stay within its quota.
- Scaling: a job that does not fit what is free but fits what is free plus the
  nodes the autoscaler may still add (`addable`) waits for those nodes
  (`Plan.scale_up`: the dispatcher asks the autoscaler for its gang); it
  preempts nobody, and the nodes it counts on are not promised to a later job.
- Preemption: only when scaling cannot help. A job whose class allows it and that
  has waited `preempt_after_s` may stop running jobs of strictly lower classes,
  newest first (least work lost), as few as make it fit. The freed resources are
  held for it, and it is admitted in a later cycle once Ray has released them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gang:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0

    @classmethod
    def of(cls, spec) -> Gang:
        """The gang of a trainer config (any `trainers.specs.ScalingSpec`)."""
        return cls(spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


@dataclass(frozen=True)
class PriorityClass:
    name: str
    rank: int                          # higher runs first
    preempt_after_s: float | None = None  # None: never preempts
    # By default a job stops only its own tenant's jobs: across tenants, the victim's tenant would pay
    # for a restart it did not choose.
    preempts_other_tenants: bool = False


@dataclass(frozen=True)
class Quota:
    cpus: float = float("inf")
    gpus: float = float("inf")


@dataclass(frozen=True)
class PolicyConfig:
    classes: dict[str, PriorityClass]
    quotas: dict[str, Quota] = field(default_factory=dict)
    default_quota: Quota = Quota()
    aging_s: float = 3600.0            # waiting this long is worth one class rank

    def quota(self, tenant: str) -> Quota:
        return self.quotas.get(tenant, self.default_quota)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    tenant: str
    priority: str
    submitted_at: float
    gang: Gang


@dataclass(frozen=True)
class RunningJob:
    id: str
    tenant: str
    priority: str
    started_at: float
    gang: Gang


@dataclass
class Plan:
    admit: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    scale_up: list[str] = field(default_factory=list)      # waiting for nodes the autoscaler may add
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits


Node = dict[str, float]  # free resources of one node: {"CPU": 2.0, "GPU": 1.0}


def effective_priority(job: QueuedJob, cfg: PolicyConfig, now: float) -> float:
    waited = max(0.0, now - job.submitted_at)
    return cfg.classes[job.priority].rank + waited / cfg.aging_s


def order(queued: list[QueuedJob], cfg: PolicyConfig, now: float) -> list[QueuedJob]:
    return sorted(queued, key=lambda j: (-effective_priority(j, cfg, now), j.submitted_at, j.id))


def place(gang: Gang, nodes: list[Node]) -> list[Node] | None:
    """Free resources after placing every worker of `gang`, or None if it does not fit."""
    free = [dict(n) for n in nodes]
    for _ in range(gang.workers):
        for node in free:
            if node.get("CPU", 0.0) >= gang.cpus_per_worker - 1e-9 and \
                    node.get("GPU", 0.0) >= gang.gpus_per_worker - 1e-9:
                node["CPU"] = node.get("CPU", 0.0) - gang.cpus_per_worker
                node["GPU"] = node.get("GPU", 0.0) - gang.gpus_per_worker
                break
        else:
            return None
    return free


def infeasibility(gang: Gang, nodes: list[Node]) -> str | None:
    """Why `gang` can never be placed on `nodes` (their *total* resources), or None if it can."""
    if place(gang, nodes) is not None:
        return None
    for name, per_worker, total in (("CPU", gang.cpus_per_worker, gang.cpus), ("GPU", gang.gpus_per_worker,
                                                                                 gang.gpus)):
        biggest = max((n.get(name, 0.0) for n in nodes), default=0.0)
        have = sum(n.get(name, 0.0) for n in nodes)
        if per_worker > biggest or total > have:
            return (f"asks for {total:g} {name} ({gang.workers} x {per_worker:g}) but the cluster can give "
                    f"at most {have:g} {name}, {biggest:g} on its largest node")
    return f"its {gang.workers} workers cannot be packed onto the cluster's nodes"


def plan(queued: list[QueuedJob], running: list[RunningJob], free_nodes: list[Node],
         cfg: PolicyConfig, now: float, addable: list[Node] = ()) -> Plan:
    result = Plan()
    usage: dict[str, list[float]] = {}
    for job in running:
        used = usage.setdefault(job.tenant, [0.0, 0.0])
        used[0] += job.gang.cpus
        used[1] += job.gang.gpus
    free = [dict(n) for n in free_nodes]
    spare = [dict(n) for n in addable]  # empty nodes the autoscaler may still start
    blocked_classes: set[str] = set()
    victims_left = sorted(running, key=lambda r: (cfg.classes[r.priority].rank, -r.started_at))

    for job in order(queued, cfg, now):
        cls = cfg.classes[job.priority]
        if job.priority in blocked_classes:
            result.waiting[job.id] = "behind an earlier job of its class"
            continue
        quota, used = cfg.quota(job.tenant), usage.setdefault(job.tenant, [0.0, 0.0])
        if used[0] + job.gang.cpus > quota.cpus + 1e-9 or used[1] + job.gang.gpus > quota.gpus + 1e-9:
            result.waiting[job.id] = (f"tenant {job.tenant} quota: {used[0]:g}/{quota.cpus:g} CPUs and "
                                      f"{used[1]:g}/{quota.gpus:g} GPUs in use")
            continue
        placed = place(job.gang, free)
        if placed is not None:
            free = placed
            used[0] += job.gang.cpus
            used[1] += job.gang.gpus
            result.admit.append(job.id)
            continue
        blocked_classes.add(job.priority)
        grown = place(job.gang, free + spare)
        if grown is not None:  # more nodes make it fit: ask for them rather than stop anyone
            free, spare = grown[:len(free)], grown[len(free):]
            used[0] += job.gang.cpus
            used[1] += job.gang.gpus
            result.scale_up.append(job.id)
            result.waiting[job.id] = "waiting for the autoscaler to add nodes"
            continue
        if cls.preempt_after_s is not None and now - job.submitted_at >= cls.preempt_after_s:
            chosen = _victims(job, cls, victims_left, free, cfg)
            if chosen:
                result.preempt += [v.id for v in chosen]
                victims_left = [v for v in victims_left if v not in chosen]
                free = hold(job.gang, free)  # what frees up is this job's, not the next one's
                used[0] += job.gang.cpus
                used[1] += job.gang.gpus
                result.waiting[job.id] = f"preempting {', '.join(v.id for v in chosen)}"
                continue
        result.waiting[job.id] = "waiting for free resources"
    return result


def _victims(job: QueuedJob, cls: PriorityClass, candidates: list[RunningJob], free: list[Node],
             cfg: PolicyConfig) -> list[RunningJob]:
    """The fewest lower-class running jobs (lowest class, newest first) whose release lets `job` fit.

    Without node identities for running jobs, their resources are credited to one
    pool; the dispatcher re-checks the real fit before it admits.
    """
    chosen: list[RunningJob] = []
    pool = {"CPU": sum(n.get("CPU", 0.0) for n in free), "GPU": sum(n.get("GPU", 0.0) for n in free)}
    for victim in candidates:
        if cfg.classes[victim.priority].rank >= cls.rank:
            break
        if victim.tenant != job.tenant and not cls.preempts_other_tenants:
            continue
        chosen.append(victim)
        pool["CPU"] += victim.gang.cpus
        pool["GPU"] += victim.gang.gpus
        if place(job.gang, [pool]) is not None:
            return chosen
    return []


def hold(gang: Gang, free: list[Node]) -> list[Node]:
    """Take what is free toward `gang`'s total (any node), so later jobs cannot use it."""
    held = [dict(n) for n in free]
    need_cpu, need_gpu = gang.cpus, gang.gpus
    for node in held:
        take_cpu, take_gpu = min(node.get("CPU", 0.0), need_cpu), min(node.get("GPU", 0.0), need_gpu)
        node["CPU"] = node.get("CPU", 0.0) - take_cpu
        node["GPU"] = node.get("GPU", 0.0) - take_gpu
        need_cpu -= take_cpu
        need_gpu -= take_gpu
    return held
