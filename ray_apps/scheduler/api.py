"""The queue's Python API: every interface (CLI, REST, agent tools) calls this.

    queue = Queue.from_settings(load_settings())
    job = queue.submit("mnist", {"epochs": 2}, priority="high", tenant="team-a")

Submitting validates against the trainer catalog and the largest allocation the
cluster can ever give, and stores the job QUEUED. Only the dispatcher moves jobs
into Ray; `cancel` may stop a running one. Tenancy: pass `tenant` to see and touch
only that tenant's jobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ray_apps.ray_client import PlatformError, job_client
from ray_apps.config import Settings
from ray_apps.scheduler.capacity import Capacity, read_capacity
from ray_apps.scheduler.config import QueueConfig, load_queue_config
from ray_apps.scheduler.policy import Gang, infeasibility
from ray_apps.scheduler.states import ACTIVE, JobState
from ray_apps.scheduler.store import JobRecord, JobStore, UnknownJob
from ray_apps.topology import Topology
from trainers.runtime import new_run_name
from trainers.specs import TRAINERS, SpecError, build_config, validated_params


class QueueError(ValueError):
    """A request the queue refuses; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Infeasible(QueueError):
    """The request can never run on this cluster, even fully scaled out."""


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


@dataclass
class Validation:
    ok: bool
    reason: str | None
    cpus: float
    gpus: float
    workers: int
    memory_per_worker_gib: float


@dataclass
class GpuAvailability:
    total: float
    used: float
    free: float
    by_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    queued_demand: float = 0.0
    queued_jobs: int = 0
    # Worker groups (empty for a single head): nodes running, idle and starting, and the bounds.
    groups: list[dict[str, Any]] = field(default_factory=list)


def store_url(settings: Settings) -> str:
    return settings.queue_db_url or f"sqlite:///{settings.data_dir / 'queue.db'}"


def ray_submission_id(job: JobRecord, attempt: int) -> str:
    """Deterministic per attempt: a re-dispatch after a crash reuses it and Ray refuses a twin."""
    return job.id if attempt <= 1 else f"{job.id}-r{attempt}"


@dataclass
class Queue:
    settings: Settings
    config: QueueConfig
    store: JobStore
    topology: Topology = field(default_factory=Topology)

    @classmethod
    def from_settings(cls, settings: Settings, config: QueueConfig | None = None) -> Queue:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, config or load_queue_config(), JobStore(store_url(settings)), settings.topology())

    # ------------------------------------------------------------------ submit

    def submit(self, trainer: str, params: dict[str, Any], *, priority: str | None = None,
               tenant: str | None = None) -> JobRecord:
        """Validate and enqueue. Raises QueueError (bad input) or Infeasible (never fits)."""
        spec = _spec(trainer, params)
        priority = priority or self.config.default_priority
        if priority not in self.config.priorities:
            raise QueueError(f"unknown priority {priority!r}; known: {', '.join(self.config.priorities)}",
                             field="priority")
        tenant = tenant or self.config.default_tenant
        gang = Gang.of(spec)
        job_id = new_run_name(trainer)
        reason = self._never_fits(gang, tenant)
        state = JobState.REJECTED if reason else JobState.QUEUED
        job = self.store.add(id=job_id, trainer=trainer, params=validated_params(spec, params), tenant=tenant,
                             priority=priority,
                             workers=gang.workers, cpus_per_worker=gang.cpus_per_worker,
                             gpus_per_worker=gang.gpus_per_worker, state=state, message=reason or "")
        if reason:
            raise Infeasible(f"job {job.id} rejected: {reason}", field="params")
        return job

    def validate(self, trainer: str, params: dict[str, Any], *, tenant: str | None = None) -> Validation:
        """Would this request be accepted? Nothing is queued. Raises QueueError on bad parameters."""
        spec = _spec(trainer, params)
        gang = Gang.of(spec)
        reason = self._never_fits(gang, tenant or self.config.default_tenant)
        return Validation(ok=reason is None, reason=reason, cpus=gang.cpus, gpus=gang.gpus, workers=gang.workers,
                          memory_per_worker_gib=round(spec.memory_per_worker_gib(), 2))

    def _never_fits(self, gang: Gang, tenant: str) -> str | None:
        quota = self.config.policy().quota(tenant)
        for name, asked, limit in (("CPU", gang.cpus, quota.cpus), ("GPU", gang.gpus, quota.gpus)):
            if asked > limit:
                return f"asks for {asked:g} {name} but tenant {tenant}'s quota is {limit:g} {name}"
        return infeasibility(gang, self.max_nodes())

    def max_nodes(self) -> list[dict[str, float]]:
        """Every node's total CPUs/GPUs, plus the nodes the autoscaler may still add."""
        return self.capacity().potential_nodes()

    def capacity(self) -> Capacity:
        """The nodes there are and those the autoscaler may add, read live (QueueError if Ray is away)."""
        try:
            return read_capacity(self.settings, self.topology)
        except PlatformError as exc:
            raise QueueError(str(exc)) from None

    # ------------------------------------------------------------------ read

    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        try:
            job = self.store.get(job_id)
        except UnknownJob:
            raise JobNotFound(job_id) from None
        if tenant is not None and job.tenant != tenant:
            raise JobNotFound(job_id)  # another tenant's job does not exist for you
        return job

    def list(self, *, tenant: str | None = None, states: list[JobState] | None = None,
             limit: int | None = None) -> list[JobRecord]:
        return self.store.list(tenant=tenant, states=states, limit=limit)

    def logs(self, job_id: str, *, tenant: str | None = None) -> str:
        job = self.get(job_id, tenant=tenant)
        if not job.ray_submission_id:
            return ""
        return self.ray_client().get_job_logs(job.ray_submission_id)

    # ------------------------------------------------------------------ cancel

    def cancel(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        job = self.get(job_id, tenant=tenant)
        if job.state.is_terminal():
            raise QueueError(f"job {job_id} is already {job.state.value}", field="job_id")
        was_active = job.state in ACTIVE
        job = self.store.transition(job_id, JobState.CANCELLED, expect=job.state, message="cancelled by its owner")
        if was_active and job.ray_submission_id:
            self.ray_client().stop_job(job.ray_submission_id)  # the job fits (we admitted it), so stop is prompt
        return job

    # ------------------------------------------------------------------ GPUs

    def gpu_availability(self) -> GpuAvailability:
        capacity = self.capacity()
        res = capacity.resources
        by_node = {}
        for node, usage in res.by_node.items():
            used, total = usage.get("GPU", (0.0, 0.0))
            types = [k.split(":", 1)[1] for k in usage if k.startswith("accelerator_type:")]
            by_node[node] = {"total": total, "used": used, "free": total - used,
                             "type": types[0] if types else ("logical" if total else None)}
        queued = self.store.list(states=[JobState.QUEUED])
        return GpuAvailability(total=res.total.get("GPU", 0.0), used=res.used.get("GPU", 0.0),
                               free=res.free("GPU"), by_node=by_node,
                               queued_demand=sum(j.workers * j.gpus_per_worker for j in queued),
                               queued_jobs=len(queued),
                               groups=[dataclasses.asdict(g) for g in capacity.groups.values()])

    def ray_client(self):
        return job_client(self.settings.dashboard_url)


def _spec(trainer: str, params: dict[str, Any]):
    """The validated trainer config; a bad trainer or parameter is a QueueError naming the field."""
    try:
        return build_config(trainer, params)
    except SpecError as exc:
        raise QueueError(str(exc), field="params" if trainer in TRAINERS else "trainer") from None
