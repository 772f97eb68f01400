"""The platform's REST API on Ray Serve: the queue over HTTP.

    POST   /v1/jobs           queue a catalogued trainer      201 / 401 / 403 / 409 / 422 / 429
                              (Idempotency-Key: a retry returns the first job;
                              with `search`: a Ray Tune search over it)
    GET    /v1/jobs           the caller's jobs, newest first (?limit=&after=<last id>)
    GET    /v1/jobs/{id}      one job and its events          404 if unknown or not the caller's
    DELETE /v1/jobs/{id}      cancel it                       409 if already finished
    GET    /v1/jobs/{id}/why  why it waits: kind, reason, position in its class, estimated start
    POST   /v1/jobs/{id}/budget-override   an admin lets a queued job start past its tenant's budget
    GET    /v1/gpus           GPUs by node, and queued demand
    GET    /v1/costs/report   spend by tenant/trainer/day (?since=7d&by=tenant,trainer)
    GET    /v1/costs/budget   spend and forecasts against a budget (?budget_usd=50&since=30d)
    GET    /v1/costs/{id}     a job's metered cost, live while it runs
    POST   /v1/forecast       {"job_id"} or {"trainer", "params"}: remaining time and cost, 90% interval
    GET    /v1/recommendations/{run_id}   measured savings for a finished run
    GET    /v1/audit          the audit log as JSON lines (?since=7d&tenant=): admins all, others their tenant's

The cost routes are answered by the CostForecaster deployment (ray_apps.serve.cost_service).

Bad input is a 4xx whose body names the field and the reason, never a 500. With
tokens configured (`oppen users add`, or `OPPEN_TENANT_TOKENS`; ray_apps/auth.py) every
request but the health check and the status page's HTML carries
`Authorization: Bearer <token>`: viewers read their tenant's data, members also submit
and cancel, admins see every tenant. Without tokens the platform is loopback only.
Submits and cancels, accepted or refused, are records of the audit log (ray_apps/audit.py) with the
caller and the client's address; the read routes too when `audit.reads` is set.
"""

# No `from __future__ import annotations`: FastAPI under Serve's ingress resolves the
# handlers' annotations outside this module, so they must be real types, not strings.
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_apps.config import load_settings
from ray_apps.costs.report import parse_since
from ray_apps.observability.status import PAGE as STATUS_PAGE
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobRecord
from ray_apps.scheduler.view import job_view
from ray_apps.serve.cost_service import CostForecaster
from ray_apps.auth import Caller, Role
from ray_apps.serve.http_common import (ON_HEAD_NODE, InProcess, actor_of, answers_errors_as_problems, caller_of,
                                        errors, limit_body_size, loopback_hosts_only, require_token,
                                        settings_users)
from trainers.errors import Forbidden, NotFound, OppenError, Refused
from trainers.tune import MAX_CONCURRENT, MAX_SAMPLES, MAX_SPACE_ITEM_CHARS, MAX_SPACE_ITEMS

app = FastAPI(title="Oppen platform API", version="1",
              description="A durable priority queue with quotas and preemption in front of Ray.")


class SearchSettings(BaseModel):
    """A Ray Tune search over the trainer (trainers.tune): `params` are fixed for every trial."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="trials to draw")
    max_concurrent: int = Field(1, ge=1, le=MAX_CONCURRENT,
                                description="trials at once; the job holds this many trials' gangs")
    budget_usd: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="stop launching trials once they have spent this")
    space: list[Annotated[str, Field(min_length=3, max_length=MAX_SPACE_ITEM_CHARS)]] | None = Field(
        None, min_length=1, max_length=MAX_SPACE_ITEMS,
        description="name=kind:args items, e.g. lr=loguniform:1e-4:1e-2 (default: the trainer's)")
    search_seed: int = Field(0, ge=0, le=2**31 - 1)
    grace_period: int = Field(1, ge=1, le=10_000, description="ASHA: reports before a trial may be stopped")


class SubmitJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainer: str = Field(description="a catalogued trainer, e.g. mnist", max_length=32)
    params: dict[str, Any] = Field(default_factory=dict, description="trainer parameters by field name")
    search: SearchSettings | None = Field(None, description="queue a Ray Tune search over the trainer instead")
    priority: str | None = Field(None, max_length=32)
    tenant: str | None = Field(None, max_length=64, description="ignored when tokens name the tenant")


class JobOut(BaseModel):
    id: str
    trainer: str
    params: dict[str, Any]
    tenant: str
    priority: str
    state: JobState
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    attempt: int
    ray_submission_id: str | None
    mlflow_run_id: str | None
    message: str
    waited_s: float = Field(description="seconds from submission to start (or to now, or to its end unstarted)")
    search: dict[str, Any] | None = Field(None, description="a search's settings; null for a training job")

    @classmethod
    def of(cls, job: JobRecord) -> "JobOut":
        return cls(**job_view(job))


class EventOut(BaseModel):
    at: float
    from_state: str | None
    to_state: str
    message: str


class JobDetail(JobOut):
    events: list[EventOut]


class StartEstimate(BaseModel):
    low: float | None = Field(description="seconds from now, earliest")
    mid: float | None
    high: float | None = Field(description="seconds from now, latest; null: no upper bound known")


class WhyOut(BaseModel):
    id: str
    state: str
    priority: str
    tenant: str
    kind: str = Field(description="quota, cohort, budget, cap, capacity, packing, nodes, behind, preempting, "
                                  "mlflow, new; or the state of a job that is not queued")
    reason: str
    position: int | None = Field(description="1-based among the queued jobs of its priority class")
    of: int | None
    start_in_s: StartEstimate | None
    as_of: float | None = Field(description="when the dispatcher decided it (epoch seconds)")


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, max_length=64, description="a queued or running job")
    trainer: str | None = Field(None, max_length=32, description="or a trainer config not yet run")
    params: dict[str, Any] = Field(default_factory=dict)


# Defined above the deployment: Serve's ingress captures the module globals the handlers use.
def _answer(result: dict) -> dict:
    """A CostForecaster result, or its refusal as the 4xx it names."""
    if "error" in result:
        raise OppenError.from_dict(result["error"])
    return result


def _acting_tenant(caller: Caller, asked: str | None) -> str | None:
    """The tenant a job is submitted for: the caller's own; an admin (or local mode) may name one."""
    if caller.role is Role.ADMIN:
        return asked or caller.tenant
    if asked not in (None, caller.tenant):
        raise Forbidden(f"your token is for tenant {caller.tenant!r}, not {asked!r}", "tenant")
    return caller.tenant


PUBLIC = ("/v1/health", "/status")
limit_body_size(app)
answers_errors_as_problems(app, public=PUBLIC)
loopback_hosts_only(app, load_settings().host)
require_token(app, settings_users, public=PUBLIC)


@serve.deployment(num_replicas=1, ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=32)
@serve.ingress(app)
class PlatformAPI:
    def __init__(self, costs: DeploymentHandle | None):
        # None: the cost service runs in this replica (settings.serve_in_ingress), called alike.
        self.costs = costs or InProcess(CostForecaster.func_or_class())
        self.settings = load_settings()
        self.queue = Queue.from_settings(self.settings)

    def _tenant(self, authorization: str | None, request: Request | None = None, read: str | None = None,
                target: str | None = None) -> str | None:
        """The tenant whose data the caller may read (None: all, for admins and local mode). With `read`
        (the action's name), the read is audited when the settings ask for reads to be."""
        caller = caller_of(settings_users(), authorization)
        if read and request is not None and self.queue.audit.reads:
            self.queue.audit.record_read(actor_of(caller, request), read, target, dict(request.query_params))
        return caller.scope

    @app.post("/v1/jobs", status_code=201, response_model=JobOut, responses=errors(409, 429))
    def submit(self, body: SubmitJob, request: Request, authorization: str | None = Header(None),
               idempotency_key: str | None = Header(None, max_length=128, pattern=r"^[\x21-\x7e]+$", description=(
                   "retrying with the same key returns the job the first request made"))) -> JobOut:
        caller = caller_of(settings_users(), authorization)
        actor = actor_of(caller, request)
        with self.queue.audit.refusals(actor, "job.submit", params=body.model_dump(exclude_none=True)):
            caller.require(Role.MEMBER, "submitting a job")  # a viewer's attempt is audited as refused
            tenant = _acting_tenant(caller, body.tenant)
        search = body.search.model_dump() if body.search else None
        job = self.queue.submit(body.trainer, body.params, search=search, priority=body.priority, tenant=tenant,
                                idempotency_key=idempotency_key, actor=actor)
        return JobOut.of(job)

    @app.get("/v1/jobs", response_model=list[JobOut])
    def list_jobs(self, request: Request, response: Response, state: JobState | None = None,
                  limit: int = Query(200, ge=1, le=1000),
                  after: str | None = Query(None, max_length=64, description="the last job id of the previous page"),
                  authorization: str | None = Header(None)) -> list[JobOut]:
        """The caller's jobs, newest first; the `X-Next-After` header is the `after` of the next page."""
        tenant = self._tenant(authorization, request, "job.list")
        try:
            jobs = self.queue.list(tenant=tenant, states=[state] if state else None,
                                   limit=limit, newest_first=True, after_id=after)
        except NotFound:
            raise Refused(f"no job {after!r} of yours to continue after", "after") from None
        if len(jobs) == limit:
            response.headers["X-Next-After"] = jobs[-1].id
        return [JobOut.of(j) for j in jobs]

    @app.get("/v1/jobs/{job_id}", response_model=JobDetail, responses=errors(404))
    def get_job(self, job_id: str, request: Request, authorization: str | None = Header(None)) -> JobDetail:
        job = self.queue.get(job_id, tenant=self._tenant(authorization, request, "job.read", job_id))
        events = [EventOut(at=e.at, from_state=e.from_state, to_state=e.to_state, message=e.message)
                  for e in self.queue.store.events(job.id)]
        return JobDetail(**JobOut.of(job).model_dump(), events=events)

    @app.get("/v1/jobs/{job_id}/why", response_model=WhyOut, responses=errors(404))
    def why(self, job_id: str, request: Request, authorization: str | None = Header(None)) -> WhyOut:
        """Why the job waits, where it stands in its class and when it should start."""
        answer = self.queue.why(job_id, tenant=self._tenant(authorization, request, "job.why", job_id))
        return WhyOut(**answer.as_dict())

    @app.post("/v1/jobs/{job_id}/budget-override", response_model=JobOut, responses=errors(404, 409))
    def budget_override(self, job_id: str, request: Request, authorization: str | None = Header(None)) -> JobOut:
        caller = caller_of(settings_users(), authorization)
        actor = actor_of(caller, request)
        with self.queue.audit.refusals(actor, "job.budget_override", job_id, tenant=caller.scope):
            caller.require(Role.ADMIN, "letting a job past its tenant's budget")
        return JobOut.of(self.queue.allow_over_budget(job_id, actor=actor))

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, responses=errors(404, 409))
    def cancel(self, job_id: str, request: Request, authorization: str | None = Header(None)) -> JobOut:
        caller = caller_of(settings_users(), authorization)
        actor = actor_of(caller, request)
        with self.queue.audit.refusals(actor, "job.cancel", job_id, tenant=caller.scope):
            caller.require(Role.MEMBER, "cancelling a job")
        return JobOut.of(self.queue.cancel(job_id, tenant=caller.scope, actor=actor))

    @app.get("/v1/gpus")
    def gpus(self, request: Request, authorization: str | None = Header(None)) -> dict:
        self._tenant(authorization, request, "gpus.read")
        return vars(self.queue.gpu_availability())

    @app.get("/v1/audit", response_class=Response, responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "one audit record per line, oldest first"},
        **errors(403)})
    def audit(self, request: Request, since: str | None = Query(None, max_length=40, description="7d, 12h or an ISO date"),
              tenant: str | None = Query(None, max_length=64, description="an admin's filter: one tenant's records"),
              authorization: str | None = Header(None)) -> Response:
        """Who did what: admins read every record, others only their own tenant's."""
        scope = self._tenant(authorization, request, "audit.read")
        if scope is not None and tenant not in (None, scope):
            raise Forbidden(f"your token is for tenant {scope!r}, not {tenant!r}", "tenant")
        try:
            start = parse_since(since)
        except Refused as exc:
            raise Refused(str(exc), "since") from None
        lines = self.queue.audit.export_jsonl(start, scope or tenant)
        return Response("".join(lines), media_type="application/x-ndjson")

    # ------------------------------------------------------------------ costs (CostForecaster)

    @app.get("/v1/costs/report")
    async def cost_report(self, request: Request, since: str = "30d", by: str = "tenant,trainer",
                          authorization: str | None = Header(None)) -> dict:
        tenant = self._tenant(authorization, request, "cost.report")
        return _answer(await self.costs.report.remote(since, by, tenant))

    @app.get("/v1/costs/budget")
    async def cost_budget(self, request: Request, budget_usd: float | None = None, since: str | None = None,
                          authorization: str | None = Header(None)) -> dict:
        tenant = self._tenant(authorization, request, "cost.budget")
        return _answer(await self.costs.budget.remote(budget_usd, since, tenant))

    @app.get("/v1/costs/{job_id}", responses=errors(404))
    async def job_cost(self, job_id: str, request: Request, authorization: str | None = Header(None)) -> dict:
        tenant = self._tenant(authorization, request, "cost.read", job_id)
        return _answer(await self.costs.job_cost.remote(job_id, tenant))

    @app.post("/v1/forecast", responses=errors(404, 409))
    async def forecast(self, body: ForecastRequest, request: Request, authorization: str | None = Header(None)) -> dict:
        if bool(body.job_id) == bool(body.trainer):
            raise Refused("give either a job_id, or a trainer (with params) not yet run", "job_id")
        tenant = self._tenant(authorization, request, "cost.forecast", body.job_id or body.trainer)
        return _answer(await self.costs.forecast.remote(body.job_id, body.trainer, body.params, tenant))

    @app.get("/v1/recommendations/{run_id}", responses=errors(404, 409))
    async def recommendations(self, run_id: str, request: Request, authorization: str | None = Header(None)) -> dict:
        tenant = self._tenant(authorization, request, "cost.recommendations", run_id)
        return _answer(await self.costs.recommendations.remote(run_id, tenant))

    # ------------------------------------------------------------------ status page

    @app.get("/v1/status")
    async def status(self, request: Request, authorization: str | None = Header(None)) -> dict:
        return _answer(await self.costs.status.remote(self._tenant(authorization, request, "status.read")))

    @app.get("/status", response_class=HTMLResponse)
    def status_page(self) -> HTMLResponse:
        # The page holds no data: it fetches /v1/status, with the tenant's token when one is needed.
        return HTMLResponse(STATUS_PAGE.read_text())

    @app.get("/v1/health")
    def health(self) -> dict:
        return {"status": "ok"}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: ray_apps.serve.platform_api:app_builder` in configs/serve.yaml; `args.in_ingress`
    (the local platform's serve_in_ingress) names the deployments this ingress runs itself."""
    inside = args.get("in_ingress") or []
    if not isinstance(inside, list) or not set(inside) <= {"CostForecaster"}:
        raise ValueError(f"in_ingress: a list of deployments this app can run in its ingress (CostForecaster), "
                         f"got {inside!r}")
    return PlatformAPI.bind(None if "CostForecaster" in inside else CostForecaster.bind())
