"""The cost meter: what a queued job cost, from what it held and how long Ray ran it.

    cost = allocation (workers x per-worker CPUs, GPUs, memory) x catalog rate
           x running time (sum over attempts of Ray's end - start; now for a live one)

A preempted job is charged for every attempt, queue waits for nothing. Once a job
ends its cost is frozen in the store (the day's prices) and written to its MLflow
run; the trainers' own in-run `cost_usd` metric counts training time only, the
meter's `job_cost_usd` is what the job held resources for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import Attempt, JobRecord, JobStore, StoredCost
from trainers.pricing import Allocation, PriceCatalog
from trainers.specs import SpecError, build_config

log = logging.getLogger("oppen.costs")


@dataclass(frozen=True)
class JobCost:
    job_id: str
    tenant: str
    trainer: str
    state: str
    cpus: float
    gpus: float
    memory_gib: float
    gpu_type: str | None
    seconds: float
    attempts: int
    cpu_usd: float
    gpu_usd: float
    memory_usd: float
    usd_per_hour: float
    live: bool                # still running: the figure grows
    ended_at: float | None

    @property
    def total_usd(self) -> float:
        return self.cpu_usd + self.gpu_usd + self.memory_usd

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.seconds / 3600

    @property
    def cpu_core_hours(self) -> float:
        return self.cpus * self.seconds / 3600

    def as_dict(self) -> dict:
        return {**vars(self), "total_usd": self.total_usd, "gpu_hours": self.gpu_hours,
                "cpu_core_hours": self.cpu_core_hours}


def allocation_for(spec) -> Allocation:
    """The whole gang a trainer config reserves; memory from the trainer's own estimate."""
    return Allocation(cpus=spec.total_cpus, gpus=spec.total_gpus,
                      memory_gib=spec.memory_per_worker_gib() * spec.num_workers)


def allocation_of(job: JobRecord) -> Allocation:
    """The gang the job's record reserved (a search: all its concurrent trials' workers), with the
    memory per worker its trainer config estimates."""
    held = Allocation(cpus=job.workers * job.cpus_per_worker, gpus=job.workers * job.gpus_per_worker)
    try:
        spec = build_config(job.trainer, job.params)
    except SpecError:  # a trainer since renamed: CPUs and GPUs are in the record, memory is not
        return held
    if job.search is None:
        return allocation_for(spec)
    return Allocation(cpus=held.cpus, gpus=held.gpus, memory_gib=spec.memory_per_worker_gib() * job.workers)


def running_seconds(attempts: list[Attempt], now: float) -> float:
    return sum(max(0.0, (a.ended_at if a.ended_at is not None else now) - a.started_at) for a in attempts)


class Meter:
    def __init__(self, store: JobStore, catalog: PriceCatalog):
        self.store = store
        self.catalog = catalog

    def cost_of(self, job: JobRecord, *, now: float | None = None) -> JobCost:
        return self.costs_of([job], now=now)[job.id]

    def costs_of(self, jobs: list[JobRecord], *, now: float | None = None) -> dict[str, JobCost]:
        """Costs of many jobs in two queries: stored figures for metered jobs, live ones for the rest."""
        now = time.time() if now is None else now
        ids = [j.id for j in jobs]
        stored = self.store.costs(ids)
        attempts = self.store.attempts(ids)
        out = {}
        for job in jobs:
            alloc = allocation_of(job)
            runs = attempts.get(job.id, [])
            if job.id in stored:
                c = stored[job.id]
                seconds, parts, rate = c.seconds, (c.cpu_usd, c.gpu_usd, c.memory_usd), c.usd_per_hour
            else:
                # A finished job not metered yet is charged up to its end, never up to now.
                until = job.ended_at if job.state.is_terminal() and job.ended_at else now
                seconds = running_seconds(runs, until)
                breakdown = self.catalog.cost(alloc, seconds)
                parts = (breakdown.cpu_usd, breakdown.gpu_usd, breakdown.memory_usd)
                rate = self.catalog.hourly_usd(alloc)
            live = job.state in (JobState.STARTING, JobState.RUNNING, JobState.PREEMPTING) and job.id not in stored
            out[job.id] = JobCost(job_id=job.id, tenant=job.tenant, trainer=job.trainer, state=job.state.value,
                                  cpus=alloc.cpus, gpus=alloc.gpus, memory_gib=alloc.memory_gib,
                                  gpu_type=self.catalog.default_gpu if alloc.gpus else None, seconds=seconds,
                                  attempts=len(runs), cpu_usd=parts[0], gpu_usd=parts[1], memory_usd=parts[2],
                                  usd_per_hour=rate, live=live, ended_at=job.ended_at)
        return out

    def settle(self, job: JobRecord, ray_end_time: Callable[[JobRecord], float | None] = lambda job: None
               ) -> JobCost:
        """Freeze a finished job's cost. An attempt still open (a job cancelled while running)
        closes at Ray's end time if Ray knows it, else at the job's end."""
        for a in self.store.attempts([job.id])[job.id]:
            if a.ended_at is None:
                self.store.attempt_ended(job.id, a.attempt, ray_end_time(job) or job.ended_at or time.time())
        cost = self.cost_of(job, now=job.ended_at or time.time())
        self.store.save_cost(StoredCost(job_id=job.id, seconds=cost.seconds, cpu_usd=cost.cpu_usd,
                                        gpu_usd=cost.gpu_usd, memory_usd=cost.memory_usd,
                                        usd_per_hour=cost.usd_per_hour, metered_at=time.time(), logged=False))
        return self.cost_of(job)
