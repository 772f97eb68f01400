"""What the policy needs besides jobs and free nodes, read from the store for one dispatcher cycle.

- Forecasts: each queued job's run time and cost before it starts, from past runs of its
  trainer (the cost engine's pre-start forecast, upper bound of its interval). With no past
  run to scale from, its price for `unforecast_run_s` stands in for the cost (so a budget
  still bounds it) and its run time is unknown (so it is never backfilled on a guess).
- Usage: each tenant's decayed CPU- and GPU-seconds (fair share), from the attempts table.
- Spend: each budgeted tenant's month-to-date $ and window GPU-hours, metered so far plus
  what its running jobs are forecast to add (upper bounds), so admission counts what is
  committed, not only what is spent.
- Checkpoints: when each running job last saved a checkpoint (the trainers write it to
  Ray's GCS), so preemption can pick the victims that lose least.

Usage and spend change slowly and cost a query over many rows: they are cached for
REFRESH_S; forecasts and checkpoints are read per cycle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from ray_apps.costs.meter import allocation_of
from ray_apps.scheduler import policy
from ray_apps.scheduler.states import ACTIVE
from ray_apps.scheduler.store import JobRecord, StoredForecast

log = logging.getLogger("oppen.dispatcher")
REFRESH_S = 10.0


def month_start(now: float) -> float:
    d = datetime.fromtimestamp(now, timezone.utc)
    return datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()


def gang_of(job: JobRecord) -> policy.Gang:
    return policy.Gang(job.workers, job.cpus_per_worker, job.gpus_per_worker)


@dataclass
class _Cached:
    at: float
    value: dict


class PolicyInputs:
    def __init__(self, queue, meter, catalog):
        self.queue, self.meter, self.catalog = queue, meter, catalog
        self._usage: _Cached | None = None
        self._spend: _Cached | None = None

    @property
    def config(self):
        return self.queue.config

    # ------------------------------------------------------------------ forecasts

    def fallback_usd(self, job: JobRecord) -> float:
        """What a job with no forecast is counted as costing: its price for `unforecast_run_s`."""
        return self.catalog.hourly_usd(allocation_of(job)) * self.config.unforecast_run_s / 3600

    def queued(self, jobs: list[JobRecord], forecasts: dict[str, StoredForecast]) -> list[policy.QueuedJob]:
        out = []
        for j in jobs:
            f = forecasts.get(j.id)
            # No forecast yet (its first cycle): a budgeted tenant's job waits for it.
            cost = f.usd_high if f is not None and f.usd_high is not None else (f.usd if f else None)
            out.append(policy.QueuedJob(j.id, j.tenant, j.priority, j.submitted_at, gang_of(j),
                                        run_s=f.run_s_high if f else None, cost_usd=cost,
                                        over_budget=bool(j.over_budget)))
        return out

    def running(self, jobs: list[JobRecord], forecasts: dict[str, StoredForecast], checkpoints: dict[str, float],
                priority_of) -> list[policy.RunningJob]:
        out = []
        for j in jobs:
            f = forecasts.get(j.id)
            started = j.started_at or j.submitted_at
            ends = started + f.run_s_low if f is not None and f.run_s_low is not None else None
            out.append(policy.RunningJob(j.id, j.tenant, priority_of(j), started, gang_of(j),
                                         checkpoint_at=checkpoints.get(j.ray_submission_id or ""), ends_at=ends))
        return out

    # ------------------------------------------------------------------ fair share

    def usage(self, now: float) -> dict[str, float]:
        if self._usage is None or now - self._usage.at >= REFRESH_S:
            fair = self.config.fair_share
            since = now - 5 * fair.half_life_s  # older usage weighs under 1/32: not worth reading
            intervals = self.queue.store.usage_intervals(since, now)
            self._usage = _Cached(now, policy.decayed_usage(intervals, now, policy.FairShare(
                fair.half_life_s, fair.gpu_weight)))
        return self._usage.value

    # ------------------------------------------------------------------ budgets

    def spend(self, now: float, forecasts_of) -> dict[str, policy.Spend]:
        """Per tenant with a budget: month-to-date $ and window GPU-hours, running jobs at the larger
        of what they have used and what they were forecast to use."""
        cfg = self.config.policy()
        if not cfg.budgets and cfg.default_budget is None:
            return {}
        if self._spend is not None and now - self._spend.at < REFRESH_S:
            return self._spend.value
        window = now - self.config.budget_window_days * 86400
        since = min(month_start(now), window)
        jobs = [j for j in self.queue.store.list(ended_after=since) if cfg.budget(j.tenant) is not None]
        costs = self.meter.costs_of(jobs, now=now)
        attempts = self.queue.store.attempts([j.id for j in jobs])
        forecasts = forecasts_of([j.id for j in jobs if j.state in ACTIVE])
        out: dict[str, list[float]] = {}
        month = month_start(now)
        for j in jobs:
            total = out.setdefault(j.tenant, [0.0, 0.0])
            cost = costs.get(j.id)
            usd = cost.total_usd if cost else 0.0
            gpu_s = sum(max(0.0, (a.ended_at or now) - max(a.started_at, window)) for a in attempts.get(j.id, [])
                        if (a.ended_at or now) > window) * j.workers * j.gpus_per_worker
            if j.state in ACTIVE:  # committed: what it was forecast to take, or what it took if more
                f = forecasts.get(j.id)
                usd = max(usd, f.usd_high if f and f.usd_high is not None else self.fallback_usd(j))
                run_s = f.run_s_high if f and f.run_s_high is not None else self.config.unforecast_run_s
                gpu_s = max(gpu_s, run_s * j.workers * j.gpus_per_worker)
            if (j.ended_at or now) >= month:
                total[0] += usd
            total[1] += gpu_s / 3600
        self._spend = _Cached(now, {t: policy.Spend(usd, gh) for t, (usd, gh) in out.items()})
        return self._spend.value

    def invalidate(self) -> None:
        """After admissions: the next cycle counts them."""
        self._spend = None
        self._usage = None


def checkpoints_of(gcs_address: str, jobs: list[JobRecord]) -> dict[str, float]:
    """Each running job's last checkpoint time by Ray submission id ({} when the GCS does not answer)."""
    from ray_apps.ray_client import use_ray_token
    from trainers.drain import last_checkpoints

    use_ray_token()  # Ray's GCS client sends the cluster's token only once the process says so
    sids = [j.ray_submission_id for j in jobs if j.ray_submission_id]
    if not sids:
        return {}
    try:
        return last_checkpoints(gcs_address, sids)
    except Exception as exc:  # noqa: BLE001 - Ray's GCS away: every job counts as losing all since its start
        log.debug("no checkpoint times: %s", exc)
        return {}
