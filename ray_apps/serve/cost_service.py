"""The cost-forecast service: a Ray Serve deployment over `ray_apps.costs.service`.

Its own deployment (own replicas, own row in the Ray dashboard) behind the
platform's HTTP ingress, which calls it through a handle. Results are plain
dicts; a refusal comes back as {"error": {...}} (`OppenError.as_dict`), which the
ingress raises again as the same kind of error: exception types do not survive a
process boundary intact.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ray import serve

from ray_apps.config import load_settings
from ray_apps.costs.service import CostService
from ray_apps.serve.http_common import ON_HEAD_NODE
from trainers.errors import OppenError, Unavailable

log = logging.getLogger("oppen.costs")


def guarded(call: Callable[[], Any]) -> Any:
    """Run `call`; a refusal comes back as {"error": OppenError.as_dict()} (the ingress raises it again)."""
    try:
        return call()
    except OppenError as exc:
        return {"error": exc.as_dict()}
    except Exception as exc:  # noqa: BLE001 - MLflow or the store unreachable: a 503 that says so
        if type(exc).__module__.startswith(("mlflow", "requests", "urllib3", "sqlalchemy")):
            log.warning("cost service dependency failed: %s", exc)
            return {"error": Unavailable(f"a backing service failed: {type(exc).__name__}: {str(exc)[:300]}"
                                         ).as_dict()}
        raise


@serve.deployment(num_replicas=1, ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=64)
class CostForecaster:
    def __init__(self):
        self.settings = load_settings()
        self.costs = CostService.from_settings(self.settings)

    def job_cost(self, job_id: str, tenant: str | None) -> dict:
        return guarded(lambda: self.costs.job_cost(job_id, tenant=tenant).as_dict())

    def report(self, since: str | None, group_by: str | None, tenant: str | None) -> dict:
        return guarded(lambda: self.costs.report(since=since, group_by=group_by, tenant=tenant).as_dict())

    def budget(self, budget_usd: float | None, since: str | None, tenant: str | None) -> dict:
        return guarded(lambda: self.costs.budget(budget_usd, tenant=tenant, since=since).as_dict())

    def forecast(self, job_id: str | None, trainer: str | None, params: dict, tenant: str | None) -> dict:
        if job_id:
            return guarded(lambda: {"job_id": job_id, **self.costs.forecast_job(job_id, tenant=tenant).as_dict()})
        return guarded(lambda: {"trainer": trainer, **self.costs.forecast_new(trainer, params).as_dict()})

    def status(self, tenant: str | None) -> dict:
        from ray_apps.observability.status import snapshot

        return guarded(lambda: snapshot(self.costs, self.settings, tenant))

    def recommendations(self, run_id: str, tenant: str | None) -> dict:
        return guarded(lambda: {"run_id": run_id, "recommendations": [
            r.as_dict() for r in self.costs.recommend(run_id, tenant=tenant)]})
