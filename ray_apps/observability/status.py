"""What the status page shows, in one snapshot: the queue, running jobs with live cost and
forecast, recent jobs with where their time went (queued, starting, first step, training,
finishing: trainers.phases), the cluster's nodes per worker group, and spend over time and per
tenant, each job linked to its Ray job and MLflow run. Served as JSON by the CostForecaster
(GET /v1/status) and drawn by status.html.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray_apps.scheduler.states import ACTIVE, TERMINAL, JobState
from ray_apps.scheduler.view import job_view

PAGE = Path(__file__).with_name("status.html")
RECENT = 20
SHOWN_WAITS = 100  # queued jobs whose wait is explained on the page (two small queries each)


def _links(settings, job, experiments: dict[str, str | None], costs) -> dict[str, str | None]:
    ray = f"{settings.dashboard_url}/#/jobs/{job.ray_submission_id}" if job.ray_submission_id else None
    run = None
    if job.mlflow_run_id:
        if job.trainer not in experiments:
            try:
                exp = costs.mlflow.get_experiment_by_name(job.trainer)
                experiments[job.trainer] = exp.experiment_id if exp else None
            except Exception:  # noqa: BLE001 - MLflow away: the page still shows the job
                experiments[job.trainer] = None
        if experiments[job.trainer]:
            run = f"{settings.tracking_uri}/#/experiments/{experiments[job.trainer]}/runs/{job.mlflow_run_id}"
    return {"ray": ray, "mlflow": run}


def _job(job, now: float) -> dict[str, Any]:
    """The job view, with its gang spelled out for the page."""
    return {**job_view(job, now), "gang": f"{job.workers} x ({job.cpus_per_worker:g} CPU, {job.gpus_per_worker:g} GPU)"}


def snapshot(costs, settings, tenant: str | None = None, now: float | None = None) -> dict[str, Any]:
    """`costs`: a CostService (its queue and MLflow client are reused)."""
    now = time.time() if now is None else now
    queue, experiments = costs.queue, {}
    open_jobs = queue.list(tenant=tenant, states=[JobState.QUEUED, *ACTIVE])
    waiting = [j for j in open_jobs if j.state is JobState.QUEUED]
    queued = [{**_job(j, now), "why": queue.why(j.id, now=now).as_dict() if i < SHOWN_WAITS else None}
              for i, j in enumerate(waiting)]
    running = []
    for job in (j for j in open_jobs if j.state in ACTIVE):
        row = {**_job(job, now), "links": _links(settings, job, experiments, costs)}
        try:
            row["cost_usd"] = costs.job_cost(job.id, tenant=tenant).total_usd
        except Exception:  # noqa: BLE001 - a cost the meter cannot read yet is shown as unknown
            row["cost_usd"] = None
        try:
            f = costs.forecast_job(job.id, tenant=tenant, now=now)
            row["forecast"] = {"total_usd": f.total_usd, "low": f.total_usd_low, "high": f.total_usd_high,
                               "remaining_s": f.remaining_s, "progress": f.progress, "basis": f.basis}
        except Exception:  # noqa: BLE001 - ForecastError (no progress yet) or MLflow away: none shown
            row["forecast"] = None
        running.append(row)
    ended = queue.store.list(tenant=tenant, states=TERMINAL, ended_after=now - 7 * 86400)
    ended.sort(key=lambda j: j.ended_at or j.updated_at, reverse=True)
    stored = queue.store.costs([j.id for j in ended[:RECENT]])
    phases = queue.store.phases([j.id for j in ended[:RECENT]])
    recent = [{**_job(j, now), "cost_usd": stored[j.id].cpu_usd + stored[j.id].gpu_usd + stored[j.id].memory_usd
               if j.id in stored else None, "phases": vars(phases[j.id]) if j.id in phases else None,
               "links": _links(settings, j, experiments, costs)}
              for j in ended[:RECENT]]
    try:  # the cluster's worker groups (none in single-head mode), as the autoscaler sees them now
        nodes = [vars(g) for g in queue.capacity().groups.values()]
    except Exception:  # noqa: BLE001 - Ray away: the page still shows the queue
        nodes = []
    by_day = costs.report(since="14d", group_by="day", tenant=tenant).as_dict()["rows"]
    by_tenant = costs.report(since="30d", group_by="tenant", tenant=tenant).as_dict()["rows"]
    return {
        "time": now, "tenant": tenant, "queued": queued, "running": running, "recent": recent, "nodes": nodes,
        # Ended jobs by the day they ended; running jobs' live cost is in `running`.
        "spend_by_day": sorted(({"day": r["group"]["day"], "usd": r["total_usd"]} for r in by_day
                                if r["group"]["day"] != "running"), key=lambda r: r["day"]),
        "spend_by_tenant": sorted(({"tenant": r["group"]["tenant"], "usd": r["total_usd"]} for r in by_tenant),
                                  key=lambda r: -r["usd"]),
        "links": {"ray": settings.dashboard_url, "mlflow": settings.tracking_uri},
    }
