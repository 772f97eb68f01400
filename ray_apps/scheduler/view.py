"""A job as every front-end shows it: the REST API, the agent and MCP, the CLI and the status page
all render this one dict, so a field means the same wherever a user reads it."""

from __future__ import annotations

import time
from typing import Any

from ray_apps.scheduler.store import JobRecord


def job_view(job: JobRecord, now: float | None = None) -> dict[str, Any]:
    """The job's record with its wait as of `now` (a job that ended unstarted stopped waiting then)."""
    now = time.time() if now is None else now
    return {"id": job.id, "trainer": job.trainer, "params": job.params, "tenant": job.tenant,
            "priority": job.priority, "state": job.state.value, "workers": job.workers,
            "cpus_per_worker": job.cpus_per_worker, "gpus_per_worker": job.gpus_per_worker,
            "submitted_at": job.submitted_at, "started_at": job.started_at, "ended_at": job.ended_at,
            "waited_s": round(job.waited_s(now), 1), "attempt": job.attempt,
            "ray_submission_id": job.ray_submission_id, "mlflow_run_id": job.mlflow_run_id, "message": job.message,
            "search": job.search}


def job_line(view: dict[str, Any]) -> str:
    """One line of a terminal listing of a job view."""
    gpus = f" {view['workers'] * view['gpus_per_worker']:g} GPU" if view["gpus_per_worker"] else ""
    search = view["search"]
    kind = f"search of {search['num_samples']}, {search['max_concurrent']} at a time  " if search else ""
    return (f"{view['id']:34} {view['state']:10} {view['priority']:7} {view['tenant']:10} "
            f"{view['workers'] * view['cpus_per_worker']:g} CPU{gpus:8} waited {view['waited_s']:5.0f} s  "
            f"{kind}{view['message'][:60]}")
