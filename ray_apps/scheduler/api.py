"""The queue's Python API: every interface (CLI, REST, agent tools) calls this.

    queue = Queue.from_settings(load_settings())
    job = queue.submit("mnist", {"epochs": 2}, priority="high", tenant="team-a")

Submitting validates against the trainer catalog and the largest allocation the
cluster can ever give, and stores the job QUEUED. A Ray Tune search is a job too
(`search=` its settings, trainers.tune.SEARCH_DEFAULTS): its gang is `max_concurrent`
trials' gangs, and the dispatcher runs it as `python -m trainers.tune`. Only the
dispatcher moves jobs into Ray; `cancel` may stop a running one. Tenancy: pass `tenant` to see and touch
only that tenant's jobs. Every submit and cancel, accepted or refused, is one record of the audit log
(`ray_apps.audit`), by the `actor` the front-end names (without one: this process's user, front-end `api`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray_apps.audit import Actor, AuditLog
from ray_apps.ray_client import job_client
from ray_apps.config import Settings
from ray_apps.scheduler.capacity import Capacity, read_capacity
from ray_apps.scheduler.config import QueueConfig, load_queue_config
from ray_apps.scheduler.policy import Gang, infeasibility
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import InvalidTransition, JobRecord, JobStore, KeyReused, UnknownJob
from ray_apps.topology import Topology
from trainers.errors import Conflict, Infeasible, NotFound, RateLimited, Refused
from trainers.runtime import new_run_name
from trainers.specs import SpecError, build_config, validated_params


class QueueError(Refused):
    """A request the queue refuses; `field` names the offending input."""


class JobNotFound(NotFound):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}", field="job_id")


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
    # The audit log in the same database; None: nothing is audited (a benchmark's baseline).
    audit: AuditLog | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.audit is None:
            self.audit = AuditLog(self.store.engine, reads=self.settings.audit.reads)

    @classmethod
    def from_settings(cls, settings: Settings, config: QueueConfig | None = None) -> Queue:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, config or load_queue_config(settings.queue_file), JobStore(store_url(settings)), settings.topology())

    def _audit(self, actor: Actor | None, action: str, target: str | None, params: dict, *, tenant: str | None,
               refused: Exception | None = None) -> None:
        if self.audit is not None:
            self.audit.record(actor or Actor.local("api"), action, target, params, tenant=tenant,
                              outcome="refused" if refused else "ok", reason=str(refused or ""))

    # ------------------------------------------------------------------ submit

    def submit(self, trainer: str, params: dict[str, Any], *, search: dict[str, Any] | None = None,
               priority: str | None = None, tenant: str | None = None,
               idempotency_key: str | None = None, actor: Actor | None = None) -> JobRecord:
        """Validate and enqueue a training job, or with `search` a Ray Tune search whose trials use
        `params` (fixed) and the search's space. Raises QueueError (bad input), Infeasible (never fits),
        RateLimited, or Conflict (an idempotency key reused for another request). A key the tenant used
        before returns the job that first request made, so a client may retry a submit whose answer it lost.
        Audited as `job.submit` by `actor`: a rejected request too, with its reason."""
        asked = {"trainer": trainer, "params": params, "priority": priority,
                 **({"search": search} if search is not None else {}),
                 **({"idempotency_key": idempotency_key} if idempotency_key else {})}
        job = None  # a request that never fits is stored REJECTED: its refusal names that job
        try:
            job = self._enqueue(trainer, params, search, priority, tenant, idempotency_key)
            answered = _as_answered(job)
        except Exception as exc:
            self._audit(actor, "job.submit", job.id if job else None, asked, refused=exc,
                        tenant=job.tenant if job else tenant or self.config.default_tenant)
            raise
        self._audit(actor, "job.submit", job.id, asked, tenant=job.tenant)
        return answered

    def _enqueue(self, trainer: str, params: dict[str, Any], search: dict[str, Any] | None, priority: str | None,
                 tenant: str | None, idempotency_key: str | None) -> JobRecord:
        spec = _spec(trainer, params)
        priority = priority or self.config.default_priority
        if priority not in self.config.priorities:
            raise QueueError(f"unknown priority {priority!r}; known: {', '.join(self.config.priorities)}",
                             field="priority")
        tenant = tenant or self.config.default_tenant
        allowed = self.config.allowed_priorities(tenant)
        if priority not in allowed:
            raise QueueError(f"tenant {tenant} may use priorities {', '.join(allowed)}, not {priority!r}",
                             field="priority")
        clean = validated_params(spec, params)
        if search is not None:
            search = _search(trainer, clean, search)
        gang = _gang(spec, search)
        idempotency = None
        if idempotency_key is not None:
            request = json.dumps([trainer, clean, priority, *([search] if search is not None else [])],
                                 sort_keys=True)
            idempotency = (idempotency_key, hashlib.sha256(request.encode()).hexdigest())
            try:
                first = self.store.job_for_key(tenant, *idempotency)
            except KeyReused as exc:
                raise Conflict(str(exc), field="Idempotency-Key") from None
            if first is not None:
                return first
        self._check_rate(tenant)
        reason = self._never_fits(gang, tenant)
        state = JobState.REJECTED if reason else JobState.QUEUED
        try:
            job = self.store.add(id=new_run_name(f"tune-{trainer}" if search else trainer), trainer=trainer,
                                 params=clean, tenant=tenant, priority=priority, workers=gang.workers,
                                 cpus_per_worker=gang.cpus_per_worker, gpus_per_worker=gang.gpus_per_worker,
                                 state=state, message=reason or "", idempotency=idempotency, search=search)
        except KeyReused as exc:
            raise Conflict(str(exc), field="Idempotency-Key") from None
        return job

    def _check_rate(self, tenant: str) -> None:
        limit = self.config.submit_rate_per_minute
        if limit is None:
            return
        now = time.time()
        recent = sorted(self.store.submitted_since(tenant, now - 60))
        if len(recent) >= limit:
            retry_after = max(1, math.ceil(recent[len(recent) - limit] + 60 - now))
            raise RateLimited(f"tenant {tenant} submitted {len(recent)} jobs in the last minute (limit {limit}); "
                              f"retry in {retry_after} s", "tenant", retry_after=retry_after)

    def validate(self, trainer: str, params: dict[str, Any], *, tenant: str | None = None,
                 search: dict[str, Any] | None = None) -> Validation:
        """Would this request be accepted? Nothing is queued. Raises SpecError or QueueError on bad input."""
        spec = _spec(trainer, params)
        if search is not None:
            search = _search(trainer, validated_params(spec, params), search)
        gang = _gang(spec, search)
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
        """The nodes there are and those the autoscaler may add, read live (PlatformError if Ray is away)."""
        return read_capacity(self.settings, self.topology)

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
             limit: int | None = None, newest_first: bool = False, after_id: str | None = None) -> list[JobRecord]:
        """`after_id` (newest first): the page after that job, for a client paging through its jobs."""
        before = self.get(after_id, tenant=tenant) if after_id else None
        return self.store.list(tenant=tenant, states=states, limit=limit, newest_first=newest_first or bool(before),
                               before=before)

    def logs(self, job_id: str, *, tenant: str | None = None) -> str:
        job = self.get(job_id, tenant=tenant)
        if not job.ray_submission_id:
            return ""
        return self.ray_client().get_job_logs(job.ray_submission_id)

    # ------------------------------------------------------------------ cancel

    def cancel(self, job_id: str, *, tenant: str | None = None, actor: Actor | None = None) -> JobRecord:
        """Mark the job CANCELLED and ask Ray to stop it. The dispatcher stops any Ray job of a cancelled
        record every cycle until Ray confirms, so a cancel that races an admission, or whose stop fails
        here (Ray does not know the job yet, or is away), still ends the job in Ray. Audited as `job.cancel`."""
        try:
            job = self._cancel(job_id, tenant)
        except Exception as exc:
            self._audit(actor, "job.cancel", job_id, {}, tenant=tenant, refused=exc)
            raise
        self._audit(actor, "job.cancel", job.id, {}, tenant=job.tenant)
        return job

    def _cancel(self, job_id: str, tenant: str | None) -> JobRecord:
        for _ in range(5):  # the dispatcher may move the job between our read and our write
            job = self.get(job_id, tenant=tenant)
            if job.state.is_terminal():
                raise Conflict(f"job {job_id} is already {job.state.value}", field="job_id")
            try:
                job = self.store.transition(job_id, JobState.CANCELLED, expect=job.state,
                                            message="cancelled by its owner")
                break
            except InvalidTransition:
                continue
        else:
            raise Conflict(f"job {job_id} keeps changing state; try again", field="job_id")
        if job.ray_submission_id:
            try:
                self.ray_client().stop_job(job.ray_submission_id)
            except Exception:  # noqa: BLE001 - not in Ray yet, or Ray away: the dispatcher's sweep stops it
                pass
        return job

    def allow_over_budget(self, job_id: str, *, actor: Actor | None = None) -> JobRecord:
        """An admin's override: this queued job may start past its tenant's budget. Audited as
        `job.budget_override`."""
        try:
            job = self.store.allow_over_budget(job_id)
        except Exception as exc:
            self._audit(actor, "job.budget_override", job_id, {}, tenant=None, refused=exc)
            raise
        self._audit(actor, "job.budget_override", job.id, {}, tenant=job.tenant)
        return job

    def why(self, job_id: str, *, tenant: str | None = None, now: float | None = None):
        from ray_apps.scheduler.why import why

        return why(self, job_id, tenant=tenant, now=now)

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


def _as_answered(job: JobRecord) -> JobRecord:
    """A rejected request raises, the first time and on every retry with its key."""
    if job.state is JobState.REJECTED:
        raise Infeasible(f"job {job.id} rejected: {job.message}", field="params")
    return job


def _search(trainer: str, params: dict[str, Any], search: dict[str, Any]) -> dict[str, Any]:
    """The search's settings, checked as trainers.tune will run them; a bad one is a QueueError."""
    from trainers.tune import TUNABLE, check_search

    if trainer not in TUNABLE:
        raise QueueError(f"{trainer} cannot be searched; searchable trainers: {', '.join(TUNABLE)}", field="trainer")
    if not isinstance(search, dict):
        raise QueueError(f"search must be an object of search settings, got {type(search).__name__}", field="search")
    try:
        return check_search(trainer, params, search)[0]
    except SpecError as exc:
        raise QueueError(str(exc), field="search") from None


def _gang(spec, search: dict[str, Any] | None) -> Gang:
    """What a job holds: its trainer's gang, or for a search `max_concurrent` trials' gangs at once."""
    gang = Gang.of(spec)
    if search is None:
        return gang
    return Gang(gang.workers * search["max_concurrent"], gang.cpus_per_worker, gang.gpus_per_worker)


def _spec(trainer: str, params: dict[str, Any]):
    """The validated trainer config; a bad trainer or parameter is a SpecError naming the field."""
    return build_config(trainer, params)
