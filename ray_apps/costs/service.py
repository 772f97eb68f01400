"""The cost engine's one entry point: CLI, REST (Ray Serve) and agent tools call this.

    costs = CostService.from_settings(load_settings())
    costs.job_cost("mnist-...")                   # live for a running job
    costs.report(since="7d", group_by="tenant,trainer")
    costs.forecast_job("mnist-...")               # remaining time and cost, 90% interval
    costs.forecast_new("mnist", {"epochs": 4})   # before it runs, from past runs
    costs.recommend(run_id)                       # measured savings

The dispatcher calls `settle()` each cycle: finished jobs get their cost frozen in
the store and written to their MLflow run (retried until MLflow takes it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from ray_apps.ray_client import PlatformError
from ray_apps.config import Settings
from ray_apps.costs import runs
from ray_apps.costs.advisor import Recommendation, recommend
from ray_apps.costs.forecast import (Forecast, ForecastError, forecast_prestart, forecast_running, profile_run,
                                     tail_of, timer_ratio_of)
from ray_apps.costs.meter import JobCost, Meter, allocation_for
from ray_apps.costs.report import BudgetStatus, CostReport, ReportError, build_report, parse_groups, parse_since
from ray_apps.scheduler.api import JobNotFound, Queue, QueueError
from ray_apps.scheduler.states import ACTIVE, JobState
from ray_apps.scheduler.store import JobRecord
from trainers.errors import NotFound
from trainers.phases import phases_of
from trainers.pricing import PriceCatalog, load_catalog
from trainers.specs import SpecError, build_config, spec_for

log = logging.getLogger("oppen.costs")
HISTORY_TTL_S = 300.0  # past runs change when a metered job reaches MLflow (the cache key) or by hand


class RunNotFound(NotFound):
    def __init__(self, run_id: str):
        super().__init__(f"no MLflow run {run_id!r}", field="run_id")


class CostService:
    def __init__(self, queue: Queue, catalog: PriceCatalog):
        self.queue = queue
        self.catalog = catalog
        self.meter = Meter(queue.store, catalog)
        self._client = None
        self._history: dict[tuple[str, int], tuple[float, list]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, queue: Queue | None = None) -> CostService:
        return cls(queue or Queue.from_settings(settings), load_catalog(settings.costs_file))

    @property
    def mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from trainers.tracking import TrackingUnavailable, check_server, configure_http

            uri = self.queue.settings.tracking_uri
            try:
                check_server(uri, timeout=3.0)
            except TrackingUnavailable as exc:
                raise PlatformError(str(exc)) from None
            configure_http()  # fail fast instead of MLflow's minutes of retries
            self._client = MlflowClient(uri)
        return self._client

    # ------------------------------------------------------------------ meter

    def job_cost(self, job_id: str, *, tenant: str | None = None) -> JobCost:
        return self.meter.cost_of(self.queue.get(job_id, tenant=tenant))

    def report(self, *, since: str | float | None = "30d", until: float | None = None,
               group_by: str | list[str] | None = None, tenant: str | None = None) -> CostReport:
        until = time.time() if until is None else until
        start = parse_since(since, until)
        groups = parse_groups(group_by)
        jobs = [j for j in self.queue.store.list(tenant=tenant, ended_after=start) if j.submitted_at <= until]
        costs = self.meter.costs_of(jobs, now=until)
        report = build_report(list(costs.values()), since=start, until=until, group_by=groups)
        if tenant is None:  # the cluster's nodes are everyone's: not in a tenant's view
            report.set_node_usage(self.queue.store.node_usage(start, until))
        return report

    def budget(self, budget_usd: float | None = None, *, tenant: str | None = None,
               since: str | float | None = None) -> BudgetStatus:
        """Spend since `since` (default: this calendar month) + running and queued jobs' forecasts."""
        if budget_usd is None:
            budget_usd = self.queue.config.budget_usd(tenant)
            if budget_usd is None:
                raise ReportError(f"no budget given and tenant {tenant or '(all)'} has none in queue.yaml; "
                                  "pass a budget in USD")
        if not (budget_usd > 0 and math.isfinite(budget_usd)):
            raise ReportError(f"budget must be a positive amount in USD (and finite), got {budget_usd!r}")
        now = time.time()
        start = parse_since(since, now) if since is not None else _month_start(now)
        jobs = self.queue.store.list(tenant=tenant, ended_after=start)
        costs = self.meter.costs_of(jobs, now=now)
        status = BudgetStatus(tenant=tenant, budget_usd=float(budget_usd), since=start,
                              spent_usd=sum(c.total_usd for c in costs.values()), committed_usd=0.0,
                              queued_usd=0.0, unforecast_jobs=0)
        for job in jobs:
            if job.state is not JobState.QUEUED and job.state not in ACTIVE:
                continue
            try:
                fc = self.forecast_job(job.id)
                remaining = (fc.total_usd or 0.0) - fc.spent_usd if fc.total_usd is not None else None
            except Exception as exc:  # noqa: BLE001 - a forecast is best effort here (MLflow may be down)
                log.debug("no forecast for %s: %s", job.id, exc)
                remaining = None
            if remaining is None:
                status.unforecast_jobs += 1
            elif job.state is JobState.QUEUED:
                status.queued_usd += remaining
            else:
                status.committed_usd += remaining
        if status.unforecast_jobs:
            status.notes.append(f"{status.unforecast_jobs} queued or running job(s) have no forecast "
                                "(no past runs or no progress yet) and are not counted ahead")
        return status

    # ------------------------------------------------------------------ forecast

    def forecast_job(self, job_id: str, *, tenant: str | None = None, now: float | None = None) -> Forecast:
        job = self.queue.get(job_id, tenant=tenant)
        now = time.time() if now is None else now
        if job.state.is_terminal():
            cost = self.meter.cost_of(job)
            raise ForecastError(f"job {job_id} is {job.state.value}: nothing left to forecast; it cost "
                                f"${cost.total_usd:.4f} (see its cost)")
        if job.search:
            raise ForecastError(f"job {job_id} is a search: past runs forecast single training runs, not a "
                                "search of many trials; its budget_usd, if set, bounds what its trials spend")
        if job.state is JobState.QUEUED and not job.attempt:
            fc = self.forecast_new(job.trainer, job.params)
            fc.notes.insert(0, "queued, not started: forecast from past runs")
            return fc
        return self._forecast_active(job, now)

    def _units_total(self, spec, run_id: str) -> float:
        """Units of work in the run: from its config, else the `total_steps` the trainer logged
        (an LLM run given --epochs knows its step count only once its text is tokenized)."""
        if spec.total_units():
            return spec.total_units()
        logged = self.mlflow.get_run(run_id).data.params.get("total_steps")
        if not logged:
            raise ForecastError("the run has not logged its total steps yet (it is starting up); ask again soon")
        return float(logged)

    def _forecast_active(self, job: JobRecord, now: float) -> Forecast:
        spec = build_config(job.trainer, job.params)
        cost = self.meter.cost_of(job, now=now)
        if not spec.tracked or not job.mlflow_run_id:
            raise ForecastError(f"job {job.id} ({job.trainer}) reports no progress to MLflow; only tracked "
                                "trainers can be forecast while running")
        units_total = self._units_total(spec, job.mlflow_run_id)
        attempts = self.queue.store.attempts([job.id])[job.id]
        waiting = job.state is JobState.QUEUED  # preempted, waiting to resume: its progress so far still counts
        since = attempts[-1].started_at if attempts and not waiting else None
        history = self._past(job.trainer)
        points = runs.progress_points(self.mlflow, job.mlflow_run_id, since=since)
        if waiting and points:
            now = max(p.at for p in points)  # nothing runs while it waits: no unit in progress
        if not points:  # still starting: the pre-start figure less what has run so far
            fc = forecast_prestart(history=history, units_total=units_total,
                                   work_per_unit=spec.work_per_unit(), scaling=runs.scaling_of(spec),
                                   usd_per_hour=cost.usd_per_hour, trainer=job.trainer)
            if fc.remaining_s is None:
                raise ForecastError(f"job {job.id} has reported no progress yet and there are no past "
                                    f"{job.trainer} runs to forecast from; ask again after its first {spec.unit}")
            run_s = now - since if since else 0.0
            shift = lambda s: max(s - run_s, 0.0)  # noqa: E731
            rate = cost.usd_per_hour / 3600
            low, mid, high = shift(fc.remaining_s_low), shift(fc.remaining_s), shift(fc.remaining_s_high)
            return Forecast(basis="history", remaining_s=mid, remaining_s_low=low, remaining_s_high=high,
                            spent_usd=cost.total_usd, total_usd=cost.total_usd + mid * rate,
                            total_usd_low=cost.total_usd + low * rate, total_usd_high=cost.total_usd + high * rate,
                            usd_per_hour=cost.usd_per_hour, progress=0.0, units_done=0,
                            units_total=units_total, notes=["no progress reported yet: from past runs", *fc.notes])
        single = runs.latest_metric(self.mlflow, job.mlflow_run_id, spec.unit_timer) if len(points) < 2 else None
        notes = [] if history else [f"no past {job.trainer} run measured its tail: assumed 5 ± 5 s"]
        if waiting:
            notes.append("preempted and waiting in the queue: assumes it resumes from its last checkpoint; "
                         "the restart's start-up time is not included")
        return forecast_running(points=points, units_total=units_total, now=now, spent_s=cost.seconds,
                                usd_per_hour=cost.usd_per_hour, single_unit_s=single, tail=tail_of(history),
                                timer_ratio=timer_ratio_of(history), notes=notes)

    def forecast_new(self, trainer: str, params: dict[str, Any]) -> Forecast:
        try:
            spec = build_config(trainer, params)
        except SpecError as exc:
            raise QueueError(str(exc), field="params" if trainer in _trainers() else "trainer") from None
        alloc = allocation_for(spec)
        if not spec.tracked:
            raise ForecastError(f"{trainer} reports no progress or history; nothing to forecast from")
        if not spec.total_units():
            raise ForecastError(f"a {trainer} run's length is known only from --max-steps before it starts; "
                                "give max_steps to get a forecast")
        return forecast_prestart(history=self._past(trainer), units_total=spec.total_units(),
                                 work_per_unit=spec.work_per_unit(), scaling=runs.scaling_of(spec),
                                 usd_per_hour=self.catalog.hourly_usd(alloc), trainer=trainer)

    def _past(self, trainer: str) -> list:
        """Past runs, cached until another metered job reaches MLflow: a forecast is one SQLite query."""
        key = (trainer, self.queue.store.cost_generation())
        with self._lock:
            hit = self._history.get(key)
            if hit and time.monotonic() - hit[0] < HISTORY_TTL_S:
                return hit[1]
        past = runs.past_runs(self.mlflow, trainer)
        with self._lock:
            self._history = {k: v for k, v in self._history.items() if k[0] != trainer}
            self._history[key] = (time.monotonic(), past)
        return past

    # ------------------------------------------------------------------ advice

    def recommend(self, run_id: str, *, tenant: str | None = None) -> list[Recommendation]:
        from mlflow.exceptions import MlflowException

        try:
            run = self.mlflow.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RunNotFound(run_id) from None
            raise
        trainer = run.data.tags.get("oppen.trainer")
        if tenant is not None and run.data.tags.get("oppen.tenant") != tenant:
            raise RunNotFound(run_id)  # another tenant's run does not exist for you
        if trainer not in _trainers():
            raise ForecastError(f"run {run_id} is not an Oppen training run (no known oppen.trainer tag)")
        spec_cls = spec_for(trainer)
        view = runs.run_view(self.mlflow, run_id, spec_cls.val_metric)
        return recommend(view, runs.past_views(self.mlflow, trainer), self.catalog, metric=spec_cls.val_metric,
                         higher_is_better=spec_cls.val_higher_is_better)

    # ------------------------------------------------------------------ settling (the dispatcher)

    def settle(self, ray_end_time=lambda job: None, limit: int = 20) -> list[str]:
        """Freeze the cost of finished jobs, then log unlogged costs to MLflow. Returns jobs metered."""
        metered = self.meter_finished(ray_end_time, limit)
        self.log_costs(limit)
        return metered

    def meter_finished(self, ray_end_time=lambda job: None, limit: int = 20) -> list[str]:
        """Freeze the cost of finished jobs in the store (no MLflow). Returns the jobs metered."""
        metered = []
        for job in self.queue.store.unmetered(limit=limit):
            self.meter.settle(job, ray_end_time)
            metered.append(job.id)
        return metered

    def log_costs(self, limit: int = 20) -> None:
        """Log the costs not yet in MLflow to their runs, with the jobs' phases; MLflow away: retried
        on the next call."""
        for job_id in list(self.queue.store.costs(unlogged=True))[:limit]:
            job = self.queue.store.get(job_id)
            if not job.mlflow_run_id:  # an untracked job: the store is its record
                self._save_phases(job, {})
                self.queue.store.mark_cost_logged(job_id)
                continue
            try:
                self._log(job)
            except Exception as exc:  # noqa: BLE001 - MLflow down: retried next cycle
                if getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    log.warning("the MLflow run of %s is gone; its cost stays in the queue's store only", job_id)
                    self.queue.store.mark_cost_logged(job_id)
                    continue
                log.warning("cannot log the cost of %s to MLflow yet: %s", job_id, exc)
                break
            self.queue.store.mark_cost_logged(job_id)

    def _log(self, job: JobRecord) -> None:
        cost = self.meter.cost_of(job)
        attempts = self.queue.store.attempts([job.id])[job.id]
        profile = (None, None, None)
        # Only clean training runs teach forecasts (a search's parent run reports no progress of its own).
        if len(attempts) == 1 and job.state is JobState.SUCCEEDED and not job.search:
            spec = build_config(job.trainer, job.params)
            a = attempts[0]
            points = runs.progress_points(self.mlflow, job.mlflow_run_id, since=a.started_at)
            single = runs.latest_metric(self.mlflow, job.mlflow_run_id, spec.unit_timer) if len(points) < 2 else None
            profile = profile_run(points=points, started_at=a.started_at, ended_at=a.ended_at,
                                  units_total=self._units_total(spec, job.mlflow_run_id), single_unit_s=single)
        phases = self._save_phases(job, self.mlflow.get_run(job.mlflow_run_id).data.tags, attempts)
        runs.log_job_cost(self.mlflow, job.mlflow_run_id, cost, job.id, profile,
                          phases.as_metrics() if phases else {})

    def _save_phases(self, job: JobRecord, tags: dict[str, str], attempts=None):
        """Where the job's last attempt spent its time (trainers.phases), kept for the status page."""
        if attempts is None:
            attempts = self.queue.store.attempts([job.id])[job.id]
        phases = phases_of(job.submitted_at, [(a.started_at, a.ended_at) for a in attempts], tags)
        if phases:
            self.queue.store.save_phases(job.id, phases)
        return phases


def _trainers() -> set[str]:
    from trainers.specs import TRAINERS

    return set(TRAINERS)


def _month_start(now: float) -> float:
    from datetime import datetime, timezone

    d = datetime.fromtimestamp(now, tz=timezone.utc)
    return d.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


__all__ = ["CostService", "ForecastError", "ReportError", "RunNotFound", "JobNotFound"]
