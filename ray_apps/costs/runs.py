"""What the cost engine reads from and writes to MLflow.

Trainers log `elapsed_s` once per unit of work at step = units done (the progress
points forecasts use); the meter adds `job_*` metrics and `oppen.cost.*` tags to a
finished job's run, including the profile (time per unit, fixed part, tail) that
later pre-start forecasts learn from.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ray_apps.costs.advisor import RunView
from ray_apps.costs.forecast import PastRun, Progress
from trainers.specs import SpecError, build_config, spec_for

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ray_apps.costs.meter import JobCost

PROGRESS_METRIC = "elapsed_s"
PROFILE_METRICS = ("job_unit_s", "job_fixed_s", "job_tail_s")


def progress_points(client: MlflowClient, run_id: str, since: float | None = None) -> list[Progress]:
    """Progress points at their logging time; only those at or after `since` (the current attempt)."""
    points = [Progress(units=m.step, at=m.timestamp / 1000)
              for m in client.get_metric_history(run_id, PROGRESS_METRIC)]
    if since is not None:
        points = [p for p in points if p.at >= since - 0.001]
    return sorted(points, key=lambda p: p.units)


def latest_metric(client: MlflowClient, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value if history else None


def log_job_cost(client: MlflowClient, run_id: str, cost: JobCost, job_id: str,
                 profile: tuple[float | None, float | None, float | None], extra: dict[str, float] | None = None
                 ) -> None:
    """The metered cost, the run's profile for forecasts, and `extra` metrics (its phases)."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    values = {"job_cost_usd": cost.total_usd, "job_cost_cpu_usd": cost.cpu_usd, "job_cost_gpu_usd": cost.gpu_usd,
              "job_cost_memory_usd": cost.memory_usd, "job_run_s": cost.seconds, "job_gpu_hours": cost.gpu_hours,
              "job_cpu_core_hours": cost.cpu_core_hours}
    values.update({k: v for k, v in zip(PROFILE_METRICS, profile) if v is not None})
    values.update(extra or {})
    tags = {"oppen.cost.usd_per_hour": f"{cost.usd_per_hour:.6f}", "oppen.cost.attempts": str(cost.attempts),
            "oppen.cost.allocation": f"cpus={cost.cpus:g} gpus={cost.gpus:g} memory_gib={cost.memory_gib:.2f}"
                                     + (f" gpu_type={cost.gpu_type}" if cost.gpu_type else ""),
            "oppen.queue_job_id": job_id}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


def _experiment_id(client: MlflowClient, trainer: str) -> str | None:
    exp = client.get_experiment_by_name(trainer)
    return exp.experiment_id if exp else None


def finished_runs(client: MlflowClient, trainer: str, *, metered_only: bool, limit: int = 100) -> list:
    exp_id = _experiment_id(client, trainer)
    if exp_id is None:
        return []
    query = f"tags.`oppen.trainer` = '{trainer}' and attributes.status = 'FINISHED'"
    if metered_only:
        query += " and metrics.job_run_s > 0"
    return client.search_runs([exp_id], filter_string=query, max_results=limit,
                              order_by=["attributes.start_time DESC"])


def past_runs(client: MlflowClient, trainer: str) -> list[PastRun]:
    """Metered single-attempt runs of `trainer` with a profile: the pre-start forecast's history."""
    fields = spec_for(trainer).__dataclass_fields__
    out = []
    for run in finished_runs(client, trainer, metered_only=True):
        m, p = run.data.metrics, run.data.params
        if not all(k in m for k in ("job_unit_s", "job_fixed_s")) or run.data.tags.get("oppen.cost.attempts") != "1":
            continue
        try:
            spec = build_config(trainer, {k: None if v == "None" else v for k, v in p.items() if k in fields})
        except SpecError:
            continue  # params from an older catalog: not comparable
        units = spec.total_units() or float(p.get("total_steps", 0))
        if not units:
            continue
        out.append(PastRun(run_id=run.info.run_id, units=units, work_per_unit=spec.work_per_unit(),
                           unit_s=m["job_unit_s"], fixed_s=m["job_fixed_s"], tail_s=m.get("job_tail_s"),
                           scaling=scaling_of(spec), timer_s=m.get(spec.unit_timer)))
    return out


def scaling_of(spec) -> tuple:
    return (spec.num_workers, float(spec.cpus_per_worker), float(spec.gpus_per_worker),
            getattr(spec, "batch_size", None))


def run_view(client: MlflowClient, run_id: str, metric: str) -> RunView:
    run = client.get_run(run_id)
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
               for key in (metric, "cost_usd")}
    return RunView(run_id=run_id, trainer=run.data.tags.get("oppen.trainer", ""), params=dict(run.data.params),
                   metrics=dict(run.data.metrics), history=history)


def past_views(client: MlflowClient, trainer: str) -> list[RunView]:
    return [RunView(run_id=r.info.run_id, trainer=trainer, params=dict(r.data.params), metrics=dict(r.data.metrics))
            for r in finished_runs(client, trainer, metered_only=False)]
