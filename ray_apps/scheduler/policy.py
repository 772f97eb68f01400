"""Scheduling policy: pure functions over plain data, no I/O, no clock.

`plan()` decides, for one dispatcher cycle, which queued jobs to admit, which to
reject and which running jobs to preempt, given the free resources of each node,
and says in structured form why every other job waits. Rules, in the order a job
meets them:

- Order (`order`): classes by effective priority = class rank + seconds waited /
  `aging_s` (so a low class cannot starve forever). Within a class, fair share:
  each tenant's jobs in submission order, keyed by the tenant's recent usage
  (GPU- and CPU-seconds with a half-life, `decayed_usage`) plus what it holds and
  has queued ahead, divided by its weight; the least served tenant goes first.
- Concurrency cap: at most `max_running_jobs` jobs in Ray at once.
- Quotas and cohorts: a tenant's running + admitted CPUs and GPUs stay within its
  nominal quota, or up to its borrowing limit past it when its cohort has unused
  quota to lend (each member lends at most its lending limit).
- Budgets: a job whose forecast cost (upper bound) would take its tenant past its
  monthly $ budget or GPU-hours window waits; one that alone exceeds it is
  rejected; an admin's override lets a job past. Running jobs are never stopped
  for budget.
- Gang admission: a job is admitted only if all its workers fit the free
  resources at once (first-fit over nodes, largest workers first).
- Scaling: a job that fits once the autoscaler adds nodes (`addable`) waits for
  them (`Plan.scale_up`); it preempts nobody, and the nodes it counts on are not
  promised to a later job.
- Preemption: only when scaling cannot help. A job whose class allows it and that
  has waited `preempt_after_s` may stop running jobs of strictly lower classes;
  a job within its nominal quota may reclaim what its cohort's tenants borrowed
  (after `reclaim_after_s`). Victims minimise the work lost (time since each
  one's last checkpoint x its resources); a job inside its class's
  `min_runtime_s` is never a victim. What frees up is held for the preemptor.
- Reservation and backfill (EASY): the first job that cannot start for want of
  capacity gets a reservation at its shadow time (when running jobs' forecast
  ends free enough). A later job may start ahead of it only if it is forecast to
  end before the shadow time or uses only what the reserved job will not need.
  Jobs behind a reservation do not preempt (replayed traces: letting a higher
  class do so made preemptors churn, as what they freed went to the reserved job).

Running jobs carry no node identity: victims and shadow times are computed on
pooled CPUs and GPUs, and the dispatcher admits only what really packs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable

INF = math.inf
EPS = 1e-9
LN2 = math.log(2)

# Why a job waits (Wait.kind), for clients to branch on.
WAIT_KINDS = ("quota", "cohort", "budget", "cap", "capacity", "packing", "nodes", "behind", "preempting", "mlflow")


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
    min_runtime_s: float = 0.0         # a job of this class runs at least this long before it can be preempted


@dataclass(frozen=True)
class Quota:
    """A tenant's nominal CPUs and GPUs, and how it shares them within its cohort."""
    cpus: float = INF
    gpus: float = INF
    cohort: str | None = None
    borrow_cpus: float = INF   # how far past its nominal quota it may go on its cohort's unused quota
    borrow_gpus: float = INF
    lend_cpus: float = INF     # how much of its unused nominal quota others of its cohort may use
    lend_gpus: float = INF
    weight: float = 1.0        # its fair share relative to other tenants

    def nominal(self) -> tuple[float, float]:
        return self.cpus, self.gpus

    def ceiling(self) -> tuple[float, float]:
        if self.cohort is None:
            return self.nominal()
        return self.cpus + self.borrow_cpus, self.gpus + self.borrow_gpus

    def guaranteed(self) -> tuple[float, float]:
        """What it never lends: its nominal quota less its lending limit."""
        return (max(0.0, self.cpus - self.lend_cpus) if self.cpus < INF else INF,
                max(0.0, self.gpus - self.lend_gpus) if self.gpus < INF else INF)


@dataclass(frozen=True)
class Budget:
    usd: float | None = None        # per calendar month
    gpu_hours: float | None = None  # per window (the dispatcher sums the window's usage)


@dataclass(frozen=True)
class Spend:
    """A tenant's spend in its budget's periods: metered so far + what its running jobs are forecast to add."""
    usd: float = 0.0
    gpu_hours: float = 0.0


@dataclass(frozen=True)
class FairShare:
    half_life_s: float = 7 * 86400.0
    gpu_weight: float = 8.0   # one GPU-second counts as this many CPU-seconds of usage

    def units(self, gang: Gang) -> float:
        return gang.cpus + self.gpu_weight * gang.gpus


@dataclass(frozen=True)
class PolicyConfig:
    classes: dict[str, PriorityClass]
    quotas: dict[str, Quota] = field(default_factory=dict)
    default_quota: Quota = Quota()
    aging_s: float = 3600.0            # waiting this long is worth one class rank
    fair: FairShare = FairShare()
    budgets: dict[str, Budget] = field(default_factory=dict)
    max_running_jobs: int | None = None
    reclaim_after_s: float = 30.0      # a job within its nominal quota waits this long before reclaiming
    default_budget: Budget | None = None  # of a tenant not in `budgets`

    def quota(self, tenant: str) -> Quota:
        return self.quotas.get(tenant, self.default_quota)

    def budget(self, tenant: str) -> Budget | None:
        return self.budgets.get(tenant, self.default_budget)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    tenant: str
    priority: str
    submitted_at: float
    gang: Gang
    run_s: float | None = None        # forecast run time, upper bound (backfill, GPU-hours)
    cost_usd: float | None = None     # forecast cost, upper bound (budget)
    over_budget: bool = False         # an admin let it past its tenant's budget


@dataclass(frozen=True)
class RunningJob:
    id: str
    tenant: str
    priority: str
    started_at: float
    gang: Gang
    checkpoint_at: float | None = None  # its last registered checkpoint; None: none yet
    ends_at: float | None = None        # forecast end, lower bound (reservations); None: unknown

    def lost(self, now: float) -> tuple[float, float]:
        """CPU- and GPU-seconds thrown away if it stopped now: everything since its last checkpoint."""
        since = max(self.started_at, self.checkpoint_at or self.started_at)
        seconds = max(0.0, now - since)
        return seconds * self.gang.cpus, seconds * self.gang.gpus


@dataclass(frozen=True)
class Wait:
    kind: str     # one of WAIT_KINDS
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class Plan:
    admit: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    scale_up: list[str] = field(default_factory=list)      # waiting for nodes the autoscaler may add
    waiting: dict[str, Wait] = field(default_factory=dict)  # job id -> why it waits
    reject: dict[str, str] = field(default_factory=dict)   # job id -> why it can never be admitted
    order: list[str] = field(default_factory=list)         # the queued jobs in the order considered
    lost: dict[str, tuple[float, float]] = field(default_factory=dict)  # victim -> CPU-, GPU-seconds lost
    backfilled: list[str] = field(default_factory=list)    # admitted ahead of a reserved job


Node = dict[str, float]  # free resources of one node: {"CPU": 2.0, "GPU": 1.0}


# --------------------------------------------------------------------------- order


def effective_priority(job: QueuedJob, cfg: PolicyConfig, now: float) -> float:
    waited = max(0.0, now - job.submitted_at)
    return cfg.classes[job.priority].rank + waited / cfg.aging_s


def decayed_usage(intervals: Iterable[tuple[str, float, float, float, float]], now: float,
                  fair: FairShare) -> dict[str, float]:
    """Each tenant's usage in weighted CPU-seconds, every second counted 2^-(age / half-life).

    `intervals`: (tenant, start, end, cpus, gpus) of what ran (a running job's end is `now`)."""
    out: dict[str, float] = {}
    h = fair.half_life_s
    for tenant, start, end, cpus, gpus in intervals:
        end = min(end, now)
        if end <= start:
            continue
        # The integral of 2^-((now - t) / h) over [start, end].
        decayed = h / LN2 * (2 ** (-(now - end) / h) - 2 ** (-(now - start) / h))
        out[tenant] = out.get(tenant, 0.0) + decayed * (cpus + fair.gpu_weight * gpus)
    return out


def order(queued: list[QueuedJob], cfg: PolicyConfig, now: float, usage: dict[str, float] | None = None,
          held: dict[str, float] | None = None) -> list[QueuedJob]:
    """Classes merged by effective priority of their next job; within a class, fair share.

    A tenant's k-th job of a class is keyed by (its recent average use + what it holds + the
    jobs of its own ahead in the class) / weight, so tenants interleave by what they have had."""
    usage, held = usage or {}, held or {}
    per_class: dict[str, list[tuple[float, float, str, QueuedJob]]] = {}
    for job in sorted(queued, key=lambda j: (j.submitted_at, j.id)):
        per_class.setdefault(job.priority, []).append(job)  # type: ignore[arg-type]
    ahead: dict[tuple[str, str], float] = {}
    for name, jobs in per_class.items():
        keyed = []
        for job in jobs:
            t = job.tenant
            base = usage.get(t, 0.0) * LN2 / cfg.fair.half_life_s + held.get(t, 0.0)
            queued_ahead = ahead.get((name, t), 0.0)
            keyed.append(((base + queued_ahead) / max(cfg.quota(t).weight, EPS), job.submitted_at, job.id, job))
            ahead[(name, t)] = queued_ahead + cfg.fair.units(job.gang)
        keyed.sort(key=lambda k: k[:3])
        per_class[name] = keyed  # type: ignore[assignment]
    heads = []
    for name, keyed in per_class.items():
        job = keyed[0][3]  # type: ignore[index]
        heads.append((-effective_priority(job, cfg, now), job.submitted_at, job.id, name, 0))
    heapq.heapify(heads)
    result = []
    while heads:
        *_, name, i = heapq.heappop(heads)
        keyed = per_class[name]
        result.append(keyed[i][3])  # type: ignore[index]
        if i + 1 < len(keyed):
            nxt = keyed[i + 1][3]  # type: ignore[index]
            heapq.heappush(heads, (-effective_priority(nxt, cfg, now), nxt.submitted_at, nxt.id, name, i + 1))
    return result


# --------------------------------------------------------------------------- packing


def place(gang: Gang, nodes: list[Node]) -> list[Node] | None:
    """Free resources after placing every worker of `gang`, or None if it does not fit."""
    free = [dict(n) for n in nodes]
    for _ in range(gang.workers):
        for node in free:
            if node.get("CPU", 0.0) >= gang.cpus_per_worker - EPS and \
                    node.get("GPU", 0.0) >= gang.gpus_per_worker - EPS:
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


def _pooled(nodes: list[Node]) -> list[float]:
    return [sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)]


# --------------------------------------------------------------------------- the plan


@dataclass
class _Reservation:
    """The first job blocked on capacity: when it could start, and what it leaves over then."""
    job: QueuedJob
    shadow: float                 # INF: not known (a running job it waits on has no forecast end)
    extra: list[float]            # CPUs and GPUs it will not need at its shadow time

    def lets(self, job: QueuedJob, now: float) -> str | None:
        """How `job` may start ahead of the reserved one: 'time', 'extra', or None."""
        if job.run_s is not None and now + job.run_s <= self.shadow:
            return "time"
        if job.gang.cpus <= self.extra[0] + EPS and job.gang.gpus <= self.extra[1] + EPS:
            return "extra"
        return None


def _reserve(job: QueuedJob, running: list[RunningJob], free: list[Node], now: float) -> _Reservation | None:
    """The reservation of a job that fits no free nodes: None when it could not start even with
    every running job gone (its gang does not pack; it waits for something else)."""
    pool = _pooled(free)
    need = (job.gang.cpus, job.gang.gpus)
    every = [pool[0] + sum(r.gang.cpus for r in running), pool[1] + sum(r.gang.gpus for r in running)]
    if need[0] > every[0] + EPS or need[1] > every[1] + EPS:
        return None
    # Enough is free, scattered over nodes: what it leaves over is what is free beyond its need now, not
    # what running jobs will add (jobs started in that would refill the gaps it waits on).
    scattered = need[0] <= pool[0] + EPS and need[1] <= pool[1] + EPS
    shadow = now
    # It fits no free node now, so at least one running job must end first, even when the pooled
    # figures say enough is free (they are scattered over nodes): the shadow is never "now".
    released = 0
    for r in sorted(running, key=lambda r: INF if r.ends_at is None else r.ends_at):
        if released and need[0] <= pool[0] + EPS and need[1] <= pool[1] + EPS:
            break
        shadow = INF if r.ends_at is None else max(now, r.ends_at)
        pool[0] += r.gang.cpus
        pool[1] += r.gang.gpus
        released += 1
    if shadow == INF or scattered:  # only what is free beyond its need now is spare
        pool = _pooled(free)
    return _Reservation(job, shadow, [max(0.0, pool[0] - need[0]), max(0.0, pool[1] - need[1])])


class _Ledger:
    """Per tenant and cohort: CPUs and GPUs held, so quota and cohort checks are O(1)."""

    def __init__(self, cfg: PolicyConfig, running: list[RunningJob]):
        self.cfg = cfg
        self.used: dict[str, list[float]] = {}
        self.cohort_over: dict[str, list[float]] = {}    # what members hold past what they never lend
        self.cohort_pool: dict[str, list[float]] = {}    # what members lend
        for tenant, q in cfg.quotas.items():
            if q.cohort is not None:
                pool = self.cohort_pool.setdefault(q.cohort, [0.0, 0.0])
                pool[0] += min(q.lend_cpus, q.cpus)
                pool[1] += min(q.lend_gpus, q.gpus)
        for job in running:
            self.add(job.tenant, job.gang)

    def _over(self, tenant: str, used: list[float]) -> list[float]:
        g = self.cfg.quota(tenant).guaranteed()
        return [max(0.0, used[0] - g[0]), max(0.0, used[1] - g[1])]

    def add(self, tenant: str, gang: Gang, sign: float = 1.0) -> None:
        used = self.used.setdefault(tenant, [0.0, 0.0])
        cohort = self.cfg.quota(tenant).cohort
        before = self._over(tenant, used) if cohort else None
        used[0] += sign * gang.cpus
        used[1] += sign * gang.gpus
        if cohort:
            after = self._over(tenant, used)
            over = self.cohort_over.setdefault(cohort, [0.0, 0.0])
            over[0] += after[0] - before[0]
            over[1] += after[1] - before[1]

    def within_nominal(self, tenant: str, gang: Gang) -> bool:
        used, nominal = self.used.get(tenant, [0.0, 0.0]), self.cfg.quota(tenant).nominal()
        return used[0] + gang.cpus <= nominal[0] + EPS and used[1] + gang.gpus <= nominal[1] + EPS

    def borrowing(self, tenant: str) -> bool:
        used, nominal = self.used.get(tenant, [0.0, 0.0]), self.cfg.quota(tenant).nominal()
        return used[0] > nominal[0] + EPS or used[1] > nominal[1] + EPS

    def refusal(self, tenant: str, gang: Gang) -> Wait | None:
        """Why the tenant's quota or cohort does not let it take `gang` now, or None."""
        q = self.cfg.quota(tenant)
        used = self.used.get(tenant, [0.0, 0.0])
        ceiling = q.ceiling()
        if used[0] + gang.cpus > ceiling[0] + EPS or used[1] + gang.gpus > ceiling[1] + EPS:
            limit = "quota" if q.cohort is None else "quota and borrowing limit"
            return Wait("quota", f"tenant {tenant} {limit}: {used[0]:g}/{ceiling[0]:g} CPUs and "
                                 f"{used[1]:g}/{ceiling[1]:g} GPUs in use")
        if q.cohort is None or self.within_nominal(tenant, gang):
            return None
        after = self._over(tenant, [used[0] + gang.cpus, used[1] + gang.gpus])
        before = self._over(tenant, used)
        over, pool = self.cohort_over.get(q.cohort, [0.0, 0.0]), self.cohort_pool.get(q.cohort, [0.0, 0.0])
        for i, name in ((0, "CPUs"), (1, "GPUs")):
            if over[i] - before[i] + after[i] > pool[i] + EPS:
                return Wait("cohort", f"cohort {q.cohort} has no unused quota to lend: {over[i]:g}/{pool[i]:g} "
                                      f"lendable {name} in use by its tenants")
        return None


def plan(queued: list[QueuedJob], running: list[RunningJob], free_nodes: list[Node],
         cfg: PolicyConfig, now: float, addable: list[Node] = (), *, usage: dict[str, float] | None = None,
         spend: dict[str, Spend] | None = None, active_jobs: int | None = None) -> Plan:
    """One cycle's decisions. `usage`: decayed usage per tenant (`decayed_usage`); `spend`: per tenant
    with a budget; `active_jobs`: jobs in Ray now (default: `running`)."""
    result = Plan()
    ledger = _Ledger(cfg, running)
    spend = dict(spend or {})
    free = [dict(n) for n in free_nodes]
    spare = [dict(n) for n in addable]  # empty nodes the autoscaler may still start
    pool_now = _pooled(free)
    in_ray = len(running) if active_jobs is None else active_jobs
    held_units: dict[str, float] = {}
    for job in running:
        held_units[job.tenant] = held_units.get(job.tenant, 0.0) + cfg.fair.units(job.gang)
    victims_left = list(running)
    started: list[RunningJob] = []  # admitted by this plan: they hold resources too
    reservation: _Reservation | None = None

    ordered = order(queued, cfg, now, usage, held_units)
    result.order = [j.id for j in ordered]
    for job in ordered:
        if cfg.max_running_jobs is not None and in_ray >= cfg.max_running_jobs:
            result.waiting[job.id] = Wait("cap", f"the cluster runs its maximum of {cfg.max_running_jobs} "
                                                 "jobs at once")
            continue
        refused = ledger.refusal(job.tenant, job.gang)
        if refused:
            result.waiting[job.id] = refused
            continue
        over = _over_budget(job, cfg.budget(job.tenant), spend.get(job.tenant, Spend()))
        if over:
            if over[0] == "reject":
                result.reject[job.id] = over[1]
            else:
                result.waiting[job.id] = Wait("budget", over[1])
            continue
        need_cpu, need_gpu = job.gang.cpus, job.gang.gpus
        fits_pool = need_cpu <= pool_now[0] + EPS and need_gpu <= pool_now[1] + EPS
        placed = place(job.gang, free) if fits_pool else None
        if placed is not None and reservation is not None:
            how = reservation.lets(job, now)
            if how is None:
                result.waiting[job.id] = Wait("behind", _behind(reservation, now))
                continue
            if how == "extra":
                reservation.extra[0] -= need_cpu
                reservation.extra[1] -= need_gpu
            result.backfilled.append(job.id)
        if placed is not None:
            free = placed
            pool_now[0] -= need_cpu
            pool_now[1] -= need_gpu
            _take(job, ledger, spend, cfg)
            in_ray += 1
            result.admit.append(job.id)
            started.append(RunningJob(job.id, job.tenant, job.priority, now, job.gang,
                                      ends_at=None if job.run_s is None else now + job.run_s))
            continue
        grown = place(job.gang, free + spare) if spare and reservation is None else None
        if grown is not None:  # more nodes make it fit: ask for them rather than stop anyone
            free, spare = grown[:len(free)], grown[len(free):]
            pool_now = _pooled(free)
            _take(job, ledger, spend, cfg)
            result.scale_up.append(job.id)
            result.waiting[job.id] = Wait("nodes", "waiting for the autoscaler to add nodes")
            continue
        # Behind a reservation nobody preempts: what it frees would go to the reserved job first (its
        # claim does not outlive the cycle), so the preemptor would preempt again next cycle.
        if reservation is not None:
            result.waiting[job.id] = Wait("behind", _behind(reservation, now))
            continue
        chosen = _preemption(job, victims_left, free, ledger, cfg, now)
        if chosen:
            result.preempt += [v.id for v in chosen]
            for v in chosen:
                result.lost[v.id] = v.lost(now)
                ledger.add(v.tenant, v.gang, -1.0)
            victims_left = [v for v in victims_left if v not in chosen]
            free = hold(job.gang, free)  # what frees up is this job's, not the next one's
            pool_now = _pooled(free)
            _take(job, ledger, spend, cfg)
            result.waiting[job.id] = Wait("preempting", f"preempting {', '.join(v.id for v in chosen)}")
            continue
        left = {v.id for v in victims_left}
        reservation = _reserve(job, [r for r in running if r.id in left] + started, free, now)
        if reservation is None and addable:
            result.waiting[job.id] = Wait("capacity", "waiting for free resources: the nodes the autoscaler may "
                                                      "still add are counted on by earlier jobs")
        elif reservation is None:
            result.waiting[job.id] = Wait("packing", "its workers do not fit the cluster's free nodes even "
                                                     "once running jobs end: waiting for other nodes")
        elif fits_pool:
            result.waiting[job.id] = Wait("packing", "enough CPUs and GPUs are free, but not on few enough "
                                                     "nodes for its workers: waiting for running jobs to end")
        else:
            result.waiting[job.id] = Wait("capacity", "waiting for free resources")
    return result


def _take(job: QueuedJob, ledger: _Ledger, spend: dict[str, Spend], cfg: PolicyConfig) -> None:
    """Count an admitted (or promised) job against its tenant's quota, cohort and budget."""
    ledger.add(job.tenant, job.gang)
    if cfg.budget(job.tenant) is not None:
        s = spend.get(job.tenant, Spend())
        spend[job.tenant] = Spend(s.usd + (job.cost_usd or 0.0),
                                  s.gpu_hours + job.gang.gpus * (job.run_s or 0.0) / 3600)


def _behind(reservation: _Reservation, now: float) -> str:
    when = "" if reservation.shadow == INF else f" (from about {reservation.shadow - now:.0f} s from now)"
    return f"behind {reservation.job.id}, which has the next free resources reserved{when}"


def _over_budget(job: QueuedJob, budget: Budget | None, spent: Spend) -> tuple[str, str] | None:
    """("reject", why) if the job alone exceeds its tenant's budget, ("wait", why) if it would take the
    tenant past it now, None if it fits (or has an admin's override)."""
    if budget is None or job.over_budget:
        return None
    if budget.usd is not None:
        cost = job.cost_usd
        if cost is None:
            return "wait", (f"tenant {job.tenant} has a ${budget.usd:g} monthly budget and this job has no "
                            "cost forecast yet")
        if cost > budget.usd + EPS:
            return "reject", (f"its forecast cost ${cost:.4f} (upper bound) alone exceeds tenant {job.tenant}'s "
                              f"${budget.usd:g} monthly budget")
        if spent.usd + cost > budget.usd + EPS:
            return "wait", (f"tenant {job.tenant} budget: ${spent.usd:.4f} spent or committed this month + "
                            f"${cost:.4f} forecast for this job > ${budget.usd:g}")
    if budget.gpu_hours is not None and job.gang.gpus:
        if job.run_s is None:
            return "wait", (f"tenant {job.tenant} has a {budget.gpu_hours:g} GPU-hour budget and this job has no "
                            "run-time forecast yet")
        hours = job.gang.gpus * job.run_s / 3600
        if hours > budget.gpu_hours + EPS:
            return "reject", (f"its forecast {hours:.2f} GPU-hours alone exceed tenant {job.tenant}'s "
                              f"{budget.gpu_hours:g} GPU-hour budget")
        if spent.gpu_hours + hours > budget.gpu_hours + EPS:
            return "wait", (f"tenant {job.tenant} GPU-hour budget: {spent.gpu_hours:.2f} used or committed + "
                            f"{hours:.2f} for this job > {budget.gpu_hours:g}")
    return None


# --------------------------------------------------------------------------- preemption


def _preemption(job: QueuedJob, candidates: list[RunningJob], free: list[Node], ledger: _Ledger,
                cfg: PolicyConfig, now: float) -> list[RunningJob]:
    """The victims whose release lets `job` fit at the least work lost, or [] if none may be stopped.

    Two rights: a class with `preempt_after_s` stops strictly lower classes (its own tenant's
    unless it may cross tenants); a job within its nominal quota reclaims from cohort members that
    borrow, whatever their class. Neither stops a job inside its class's minimum runtime."""
    cls = cfg.classes[job.priority]
    waited = now - job.submitted_at
    by_class = cls.preempt_after_s is not None and waited >= cls.preempt_after_s
    cohort = cfg.quota(job.tenant).cohort
    reclaim = cohort is not None and waited >= cfg.reclaim_after_s and ledger.within_nominal(job.tenant, job.gang)
    if not (by_class or reclaim):
        return []
    eligible, borrowed = [], {}
    for v in candidates:
        if now - v.started_at < cfg.classes[v.priority].min_runtime_s:
            continue
        lower = by_class and cfg.classes[v.priority].rank < cls.rank and \
            (v.tenant == job.tenant or cls.preempts_other_tenants)
        lender = reclaim and v.tenant != job.tenant and cfg.quota(v.tenant).cohort == cohort and \
            ledger.borrowing(v.tenant)
        if lower or lender:
            eligible.append((v, not lower))
            if not lower:
                used = ledger.used.get(v.tenant, [0.0, 0.0])
                nominal = cfg.quota(v.tenant).nominal()
                borrowed[v.tenant] = [used[0] - nominal[0], used[1] - nominal[1]]
    if not eligible:
        return []
    gpu_w = cfg.fair.gpu_weight
    eligible.sort(key=lambda e: (sum(w * x for w, x in zip((1.0, gpu_w), e[0].lost(now))),
                                 cfg.classes[e[0].priority].rank, -e[0].started_at, e[0].id))
    pool = _pooled(free)
    need = (job.gang.cpus, job.gang.gpus)
    chosen = []
    for v, as_lender in eligible:
        if pool[0] >= need[0] - EPS and pool[1] >= need[1] - EPS:
            break
        if as_lender:  # reclaim only what the tenant borrows: it keeps its nominal quota
            left = borrowed[v.tenant]
            if left[0] <= EPS and left[1] <= EPS:
                continue
            left[0] -= v.gang.cpus
            left[1] -= v.gang.gpus
        chosen.append(v)
        pool[0] += v.gang.cpus
        pool[1] += v.gang.gpus
    if pool[0] < need[0] - EPS or pool[1] < need[1] - EPS:
        return []
    # Drop any victim the others make unnecessary, the costliest first.
    for v in sorted(chosen, key=lambda v: -sum(w * x for w, x in zip((1.0, gpu_w), v.lost(now)))):
        if pool[0] - v.gang.cpus >= need[0] - EPS and pool[1] - v.gang.gpus >= need[1] - EPS:
            chosen.remove(v)
            pool[0] -= v.gang.cpus
            pool[1] -= v.gang.gpus
    return chosen


# --------------------------------------------------------------------------- when will it start


def estimate_starts(ordered: list[QueuedJob], running: list[tuple[Gang, float | None]], free: list[Node],
                    now: float, default_run_s: float | None = None) -> dict[str, float | None]:
    """When each queued job could start if jobs start in `ordered` order as resources free up
    (pooled, no backfill): list scheduling over running jobs' forecast ends and queued jobs' run
    times. Call it with low, middle and high forecasts for an interval. None: not known (a job
    ahead, or one it waits on, has no forecast)."""
    pool = _pooled(free)
    events: list[tuple[float, int, float, float]] = []  # (end time, tiebreak, cpus, gpus)
    unknown = [0.0, 0.0]  # held by jobs of no known end
    for i, (gang, end) in enumerate(running):
        if end is None:
            unknown[0] += gang.cpus
            unknown[1] += gang.gpus
        else:
            events.append((max(end, now), i, gang.cpus, gang.gpus))
    heapq.heapify(events)
    seq = len(running)
    t = now
    out: dict[str, float | None] = {}
    blocked = False
    for job in ordered:
        need = (job.gang.cpus, job.gang.gpus)
        if blocked:
            out[job.id] = None
            continue
        while (pool[0] < need[0] - EPS or pool[1] < need[1] - EPS) and events:
            end, _, cpus, gpus = heapq.heappop(events)
            t = max(t, end)
            pool[0] += cpus
            pool[1] += gpus
        if pool[0] < need[0] - EPS or pool[1] < need[1] - EPS:
            blocked = True
            out[job.id] = None
            continue
        out[job.id] = t
        run_s = job.run_s if job.run_s is not None else default_run_s
        pool[0] -= need[0]
        pool[1] -= need[1]
        if run_s is None:
            unknown[0] += need[0]
            unknown[1] += need[1]
        else:
            seq += 1
            heapq.heappush(events, (t + run_s, seq, need[0], need[1]))
    return out
