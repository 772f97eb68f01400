"""The agent's tools: typed, documented, thin adapters over the platform's Python APIs.

Every tool acts as one tenant (the caller's), only starts catalogued trainers with
parameters the catalog validates (the queue and `trainers.tune` check them again),
and never runs a shell command or arbitrary code. A tool returns a JSON-able dict;
a refusal raises an OppenError (ToolError for the tools' own refusals) with a message the
agent can show as it is; `tool_problem` is what the agent and MCP hand on. What a tool changes
(a job queued or cancelled, a model served) is audited by the caller through `front_end` (agent, mcp).
"""

from __future__ import annotations

import dataclasses
import typing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ray_apps.audit import Actor
from ray_apps.config import Settings
from ray_apps.scheduler.view import job_view
from trainers.errors import Forbidden, NotFound, OppenError, Refused
from trainers.specs import (
    TRAINERS,
    bounds_text,
    build_config,
    default_trainer,
    entry_for,
    servable,
    tunable,
    user_trainers,
    widest_bounds,
)

# Trainers a user may start: the real workloads, not the scheduler's synthetic probe.
USER_TRAINERS = user_trainers()


# What "forget that" may say instead of an id: the memory the thread last named (graph.py resolves it).
REFERENCES = ("that", "it", "this", "last")

# The HTTP caller of this request (user, source address), set around the agent's turn by its front-end.
REQUEST_ACTOR: ContextVar[Actor | None] = ContextVar("oppen_request_actor", default=None)


class ToolError(Refused):
    """A tool refused its arguments; the message says why, for the user."""


def tool_problem(exc: OppenError) -> dict:
    """A refusal as a tool result: the REST API's problem body and its HTTP status."""
    return {**exc.problem(), "status": exc.status}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _catalog_params() -> type[BaseModel]:
    """Every parameter of the user trainers, typed and bounded as the catalog types and bounds it,
    described with the trainers that take it; an unknown name is refused. A parameter several
    trainers take gets the widest of their bounds; which trainer takes which, and its own bounds,
    are checked per call against the catalog (`build_config`)."""
    takers: dict[str, list[str]] = {}
    found: dict[str, list[dataclasses.Field]] = {}
    types: dict[str, Any] = {}
    for trainer in USER_TRAINERS:
        cls = TRAINERS[trainer]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            takers.setdefault(f.name, []).append(trainer)
            found.setdefault(f.name, []).append(f)
            types[f.name] = hints[f.name]
    return create_model("TrainerParams", __config__=ConfigDict(extra="forbid"), **{
        name: (_param_type(types[name], fields), Field(None, description=_param_help(fields, takers[name])))
        for name, fields in found.items()})


def _param_type(hint: Any, fields: list[dataclasses.Field]) -> Any:
    """The value's type with its bounds (or choices) attached, so the JSON schema lists them; None: unset."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if all("choices" in f.metadata for f in fields):
        return Literal[tuple(dict.fromkeys(c for f in fields for c in f.metadata["choices"]))] | None
    bounds = widest_bounds(fields)
    return (Annotated[base, Field(**bounds)] if bounds else base) | None


def _param_help(fields: list[dataclasses.Field], takers: list[str]) -> str:
    text = fields[0].metadata.get("help", fields[0].name)
    ranges = [bounds_text(f) for f in fields]
    if len(set(ranges)) > 1:  # the schema has the widest: say each trainer's own
        per_trainer = (f"{t}: {r or 'any value'}" for t, r in zip(takers, ranges))
        return f"{text} ({'; '.join(per_trainer)})"
    return f"{text} ({', '.join(takers)})"


TrainerParams = _catalog_params()


class TrainArgs(_Args):
    trainer: Literal[USER_TRAINERS] = Field(description=f"a catalogued trainer: {' or '.join(USER_TRAINERS)}")
    params: TrainerParams = Field(default_factory=TrainerParams,
                                  description="trainer parameters by field name, e.g. {'epochs': 3, 'lr': 0.01}")


class QueueArgs(TrainArgs):
    priority: str | None = Field(None, description="priority class: high, normal or low")


class JobRef(_Args):
    job_id: str = Field(description="a job id, or 'last' for the most recent job (optionally of `trainer`)")
    trainer: str | None = Field(None, description="with job_id='last': the most recent job of this trainer")


class CancelArgs(_Args):
    job_id: str | None = Field(None, description="one job to cancel")
    scope: str | None = Field(None, description="'queued' to cancel all of the caller's queued jobs")


class NoArgs(_Args):
    pass


class MetricsArgs(_Args):
    experiment: str | None = Field(None, description=f"an MLflow experiment (a trainer name: "
                                                     f"{', '.join(USER_TRAINERS)})")
    run_id: str | None = Field(None, description="one MLflow run")
    metric: str | None = Field(None, description="e.g. test_accuracy, eval_loss")
    limit: int = Field(5, ge=1, le=50)


class ReportArgs(_Args):
    since: str = Field("30d", description="7d, 12h, 2w or an ISO date")
    group_by: str = Field("tenant,trainer", description="comma-separated: tenant, trainer, day, state")


class BudgetArgs(_Args):
    budget_usd: float | None = Field(None, gt=0, description="the budget in USD (default: the tenant's)")
    since: str | None = Field(None, description="default: the start of this month")


class ForecastArgs(_Args):
    job_id: str | None = Field(None, description="a queued or running job, or 'last'")
    trainer: Literal[USER_TRAINERS] | None = Field(None, description="or a trainer config not yet run")
    params: TrainerParams = Field(default_factory=TrainerParams)


class AdviceArgs(_Args):
    run_id: str | None = Field(None, description="an MLflow run id")
    job_id: str | None = Field(None, description="or a job id / 'last' (its MLflow run)")
    trainer: str | None = None


class SearchArgs(_Args):
    trainer: Literal[tunable()] = Field(description=f"{' or '.join(tunable())}")
    num_samples: int = Field(4, ge=1, le=64, description="trials")
    max_concurrent: int = Field(1, ge=1, le=8, description="trials at once (each holds the trainer's workers)")
    budget_usd: float | None = Field(None, gt=0, allow_inf_nan=False, description="stop launching trials at this spend")
    space: list[str] | None = Field(None, min_length=1, max_length=8, description=(
        "name=kind:args items, e.g. 'lr=loguniform:1e-4:1e-2', 'batch_size=choice:64,128' (default: the trainer's)"))
    params: TrainerParams = Field(default_factory=TrainerParams, description="fixed trainer parameters")
    priority: str | None = Field(None, description="priority class: high, normal or low")


class ModelArgs(_Args):
    name: str | None = Field(None, description=f"{' or '.join(servable())}; none: all")


class DeployArgs(_Args):
    name: str = Field(description=f"the registered model: {' or '.join(servable())}")
    version: str | None = Field(None, description="a registered version number, e.g. '3'")
    alias: str | None = Field(None, description="or an alias, e.g. 'champion'; neither: champion, else newest")


class RecallArgs(_Args):
    kind: Literal["notes", "outcomes", "failures", "preemptions"] | None = Field(None, description=(
        "notes (what the user asked me to remember), outcomes (finished jobs: params, metric, cost), failures "
        "(error fingerprints with counts), preemptions (from the jobs' events); none: notes, outcomes, failures"))
    trainer: Literal[USER_TRAINERS] | None = Field(None, description="only memories of this trainer")
    text: str | None = Field(None, max_length=500, description="words to look for, e.g. part of an error line")
    job_id: str | None = Field(None, description="memories drawn from this job (e.g. its failure), or 'last'")
    team: str | None = Field(None, max_length=64, description="whose memories: a tenant (admins only; "
                                                              "others always recall their own)")
    since: str = Field("7d", max_length=40, description="preemptions: over this period (7d, 12h, an ISO date)")
    limit: int = Field(5, ge=1, le=20, description="items per kind")


class RememberArgs(_Args):
    text: str = Field(min_length=3, max_length=500, description="what to remember, in the user's words")
    trainer: Literal[USER_TRAINERS] | None = Field(None, description="the trainer it is about (default: the one "
                                                                     "the text names)")
    job_id: str | None = Field(None, description="the job it is drawn from, kept as its evidence")


class ForgetArgs(_Args):
    item_id: str = Field(min_length=1, max_length=80, description=(
        "a memory's id as recall or remember showed it (note-..., fail-..., a job id), or 'that' for the one "
        "this conversation last recalled or remembered"))


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[_Args]
    fn: Callable[..., dict]

    def schema(self) -> dict:
        """The OpenAI-style function schema a tool-calling model is given."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.args.model_json_schema()}}


class PlatformTools:
    """The tools, bound to one platform and one caller: a tenant (None: every tenant, for admins and
    loopback mode) and whether it is an admin (serving changes are)."""

    def __init__(self, settings: Settings, tenant: str | None = None, queue=None, costs=None, *, admin: bool = True,
                 request_key: str | None = None, shared: dict | None = None, front_end: str = "agent"):
        self.settings = settings
        self.tenant = tenant
        self.admin = admin
        self.front_end = front_end  # agent or mcp, as the audit log names it
        # The client's Idempotency-Key for this request: a retried request queues no second job.
        self.request_key = request_key
        self._submits = 0
        self._queue, self._costs = queue, costs
        # Opened once for this tools object and every per-caller copy of it (see `memory`).
        self._shared = shared if shared is not None else {}

    # Built on first use: a question about GPUs should not wait for MLflow.
    @property
    def queue(self):
        if self._queue is None:
            from ray_apps.scheduler.api import Queue

            self._queue = Queue.from_settings(self.settings)
        return self._queue

    @property
    def costs(self):
        if self._costs is None:
            from ray_apps.costs.service import CostService

            self._costs = CostService.from_settings(self.settings, self.queue)
        return self._costs

    @property
    def memory(self):
        """The long-term memory (ray_apps/agent/memory.py), in the data dir."""
        if "memory" not in self._shared:
            from ray_apps.agent.memory import Memory

            self._shared["memory"] = Memory.from_settings(self.settings)
        return self._shared["memory"]

    def for_caller(self, tenant: str | None, admin: bool, request_key: str | None = None) -> PlatformTools:
        return PlatformTools(self.settings, tenant, self._queue, self._costs, admin=admin, request_key=request_key,
                             shared=self._shared, front_end=self.front_end)

    def actor(self) -> Actor:
        """Who acts through these tools: the HTTP request's caller, else this machine's user."""
        caller = REQUEST_ACTOR.get()
        if caller is not None:
            return dataclasses.replace(caller, front_end=self.front_end)
        return Actor.local(self.front_end, self.tenant)

    # ------------------------------------------------------------------ helpers

    def _validated(self, trainer: str, params: dict) -> dict:
        if trainer not in USER_TRAINERS:
            raise ToolError(f"I can only start the catalogued trainers ({', '.join(USER_TRAINERS)}), "
                            f"not {trainer!r}.", "trainer")
        spec = build_config(trainer, params)
        return {k: getattr(spec, k) for k in params}

    def _job(self, job_id: str, trainer: str | None = None):
        from ray_apps.scheduler.api import JobNotFound

        if job_id in ("last", "latest"):
            jobs = [j for j in self.queue.list(tenant=self.tenant) if trainer in (None, j.trainer)]
            if not jobs:
                raise NotFound(f"you have no {trainer + ' ' if trainer else ''}jobs yet", "job_id")
            return jobs[-1]
        try:
            return self.queue.get(job_id, tenant=self.tenant)
        except JobNotFound:
            matches = [j for j in self.queue.list(tenant=self.tenant) if j.id.endswith(job_id)]
            if len(matches) == 1:  # the short suffix people copy from a listing
                return matches[0]
            raise NotFound(f"there is no job {job_id!r}" + (" of yours" if self.tenant else ""), "job_id") from None

    def _submit(self, trainer: str, params: dict, priority: str | None, search: dict | None = None) -> dict:
        """Queue a job (with `search`: a Ray Tune search) as the caller's tenant."""
        params = self._validated(trainer, params)
        key = None
        if self.request_key:
            self._submits += 1
            key = f"agent:{self.request_key}:{self._submits}"
        job = self.queue.submit(trainer, params, search=search, priority=priority, tenant=self.tenant,
                                idempotency_key=key, actor=self.actor())
        return job_view(job)

    # ------------------------------------------------------------------ the tools

    def trigger_training_job(self, trainer: str, params: dict | None = None) -> dict:
        return self._submit(trainer, params or {}, None)

    def queue_training_job(self, trainer: str, params: dict | None = None, priority: str | None = None) -> dict:
        return self._submit(trainer, params or {}, priority)

    def get_training_status(self, job_id: str, trainer: str | None = None) -> dict:
        job = self._job(job_id, trainer)
        out = job_view(job)
        if job.mlflow_run_id:
            try:
                metrics = self.costs.mlflow.get_run(job.mlflow_run_id).data.metrics
                out["latest_metrics"] = {k: metrics[k] for k in ("epoch", "step", "test_accuracy", "eval_loss",
                                                                  "perplexity", "cost_usd") if k in metrics}
            except Exception as exc:  # noqa: BLE001 - status without metrics is still an answer
                out["latest_metrics_error"] = str(exc)[:200]
        return out

    def get_job_queue_status(self) -> dict:
        from ray_apps.scheduler.states import TERMINAL

        jobs = [j for j in self.queue.list(tenant=self.tenant) if j.state not in TERMINAL]
        by_state: dict[str, int] = {}
        for j in jobs:
            by_state[j.state.value] = by_state.get(j.state.value, 0) + 1
        return {"by_state": by_state, "jobs": [job_view(j) for j in jobs[:20]], "total": len(jobs)}

    def why_is_job_waiting(self, job_id: str, trainer: str | None = None) -> dict:
        job = self._job(job_id, trainer)
        return self.queue.why(job.id, tenant=self.tenant).as_dict()

    def cancel_job(self, job_id: str | None = None, scope: str | None = None) -> dict:
        from ray_apps.scheduler.states import JobState

        if scope == "queued":
            targets = self.queue.list(tenant=self.tenant, states=[JobState.QUEUED])
        elif job_id:
            targets = [self._job(job_id)]
        else:
            raise ToolError("which job? Give a job id, or say 'cancel my queued jobs'", "job_id")
        done, refused = [], []
        for job in targets:
            try:
                done.append(self.queue.cancel(job.id, tenant=self.tenant, actor=self.actor()).id)
            except OppenError as exc:  # finished meanwhile, or changing state: say so, cancel the rest
                refused.append({"job_id": job.id, "reason": str(exc)})
        return {"cancelled": done, "refused": refused}

    def list_mlflow_experiments(self) -> dict:
        exps = self.costs.mlflow.search_experiments()
        return {"experiments": [{"name": e.name, "experiment_id": e.experiment_id} for e in exps
                                if e.name != "Default"]}

    def get_experiment_metrics(self, experiment: str | None = None, run_id: str | None = None,
                               metric: str | None = None, limit: int = 5) -> dict:
        client = self.costs.mlflow
        if run_id:
            run = client.get_run(run_id)
            if self.tenant and run.data.tags.get("oppen.tenant") != self.tenant:
                raise NotFound(f"there is no run {run_id!r} of yours", "run_id")
            return {"run_id": run_id, "metrics": run.data.metrics, "params": run.data.params}
        name = experiment or default_trainer()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise NotFound(f"there is no experiment {name!r}; try list_mlflow_experiments", "experiment")
        if metric is None and name in TRAINERS:
            metric = getattr(TRAINERS[name], "val_metric", None)
        query = f"tags.`oppen.tenant` = '{self.tenant}'" if self.tenant else ""
        runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=limit,
                                  order_by=["attributes.start_time DESC"])
        return {"experiment": name, "metric": metric, "runs": [
            {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
             **({metric: r.data.metrics.get(metric)} if metric else {}),
             "cost_usd": r.data.metrics.get("job_cost_usd", r.data.metrics.get("cost_usd"))} for r in runs]}

    def calculate_training_cost(self, job_id: str, trainer: str | None = None) -> dict:
        job = self._job(job_id, trainer)
        return self.costs.meter.cost_of(job).as_dict()

    def get_cost_report(self, since: str = "30d", group_by: str = "tenant,trainer") -> dict:
        return self.costs.report(since=since, group_by=group_by, tenant=self.tenant).as_dict()

    def check_training_budget(self, budget_usd: float | None = None, since: str | None = None) -> dict:
        return self.costs.budget(budget_usd, tenant=self.tenant, since=since).as_dict()

    def forecast_training_cost(self, job_id: str | None = None, trainer: str | None = None,
                               params: dict | None = None) -> dict:
        if job_id:
            job = self._job(job_id, trainer if job_id in ("last", "latest") else None)
            return {"job_id": job.id, **self.costs.forecast_job(job.id).as_dict()}
        if not trainer:
            raise ToolError("forecast what? Give a job id, or a trainer and its parameters", "job_id")
        params = self._validated(trainer, params or {})
        return {"trainer": trainer, **self.costs.forecast_new(trainer, params).as_dict()}

    def recommend_cost_optimization(self, run_id: str | None = None, job_id: str | None = None,
                                    trainer: str | None = None) -> dict:
        if not run_id:
            job = self._job(job_id or "last", trainer)
            if not job.mlflow_run_id:
                raise NotFound(f"job {job.id} has no MLflow run to learn from", "job_id")
            run_id = job.mlflow_run_id
        recs = self.costs.recommend(run_id, tenant=self.tenant)
        return {"run_id": run_id, "recommendations": [r.as_dict() for r in recs]}

    def get_gpu_availability(self) -> dict:
        return dataclasses.asdict(self.queue.gpu_availability())

    def validate_job_resources(self, trainer: str, params: dict | None = None) -> dict:
        params = self._validated(trainer, params or {})
        return dataclasses.asdict(self.queue.validate(trainer, params, tenant=self.tenant))

    def start_hyperparameter_search(self, trainer: str, num_samples: int = 4, max_concurrent: int = 1,
                                    budget_usd: float | None = None, space: list[str] | None = None,
                                    params: dict | None = None, priority: str | None = None) -> dict:
        """Queue a Ray Tune search: admitted like any job (quota, priority), cancellable by its id."""
        search = {"num_samples": num_samples, "max_concurrent": max_concurrent, "budget_usd": budget_usd,
                  "space": space}
        return self._submit(trainer, params or {}, priority, search=search)

    def list_models(self, name: str | None = None) -> dict:
        from trainers.registry import list_models

        if name is not None and name not in servable():
            raise NotFound(f"no model {name!r}; registered models are per trainer: {', '.join(servable())}", "name")
        models = [m for m in list_models(self.settings.tracking_uri) if name in (None, m["name"])]
        for m in models:  # the newest five versions are enough to talk about
            m["versions"] = [{k: v[k] for k in ("version", "run_id", "aliases", "tags")} for v in m["versions"][:5]]
        return {"models": models}

    def deploy_model(self, name: str, version: str | None = None, alias: str | None = None) -> dict:
        """Serve a registered version (or alias) of a model; replicas roll over with no failed request."""
        from ray_apps.scheduler.provenance import serve_if_allowed
        from trainers.registry import Selector

        with self.queue.audit.refusals(self.actor(), "model.serve", name, {"version": version, "alias": alias}):
            if not self.admin:  # what every tenant is served
                raise Forbidden("changing the served version needs the admin role; ask an admin of the platform",
                                "Authorization")
            if version is not None and alias is not None:
                raise ToolError("give a version or an alias, not both", "alias")
        selector = Selector(alias=alias, version=version)
        # Never beyond the platform's own runs: an override is for the CLI or REST.
        mv = serve_if_allowed(self.settings.tracking_uri, self.queue.store, name, selector, actor=self.actor())
        action = entry_for(name).endpoint
        return {"name": name, "selector": str(selector), "version": mv.version, "run_id": mv.run_id,
                "endpoint": f"{self.settings.serve_url}/v1/models/{name}/{action}"}

    # ------------------------------------------------------------------ memory

    def _whose(self, team: str | None) -> str | None:
        """The tenant whose memories a call reads: the caller's own; an admin or local caller (no
        tenant) may name one, else reads every tenant's."""
        if self.tenant is None or team in (None, self.tenant):
            return team if self.tenant is None else self.tenant
        raise Forbidden(f"you can recall only your own tenant's ({self.tenant}) history, not {team!r}", "team")

    def recall(self, kind: str | None = None, trainer: str | None = None, text: str | None = None,
               job_id: str | None = None, team: str | None = None, since: str = "7d", limit: int = 5) -> dict:
        """What the platform remembers: notes, job outcomes, failure fingerprints, or preemptions."""
        tenant = self._whose(team)
        if kind == "preemptions":
            return self._preemptions(tenant, since, trainer)
        if job_id:
            job_id = self._job(job_id, trainer if job_id in ("last", "latest") else None).id
        found = self.memory.recall(tenant, kind=kind, trainer=trainer, text=text, job_id=job_id, limit=limit)
        return {**found, "team": tenant}

    def _preemptions(self, tenant: str | None, since: str, trainer: str | None) -> dict:
        """Preemptions of the tenant's jobs over a period, from the queue's job events."""
        from ray_apps.costs.report import parse_since
        from ray_apps.scheduler.states import JobState

        cutoff = parse_since(since) or 0.0
        jobs = self.queue.store.list(tenant=tenant, ended_after=cutoff, newest_first=True, limit=500)
        preempted: dict[str, list] = {}
        for event in self.queue.store.events_into(JobState.PREEMPTING, cutoff):
            preempted.setdefault(event.job_id, []).append(event)
        hits = []
        for job in jobs:
            events = preempted.get(job.id)
            if events and trainer in (None, job.trainer):
                hits.append({"job_id": job.id, "tenant": job.tenant, "trainer": job.trainer, "priority": job.priority,
                             "times": len(events), "state": job.state.value, "last_at": events[-1].at,
                             "reasons": sorted({e.message for e in events if e.message}),
                             "run_ids": [job.mlflow_run_id] if job.mlflow_run_id else []})
        hits.sort(key=lambda h: (-h["times"], -h["last_at"]))
        by_priority: dict[str, int] = {}
        for h in hits:
            by_priority[h["priority"]] = by_priority.get(h["priority"], 0) + h["times"]
        return {"kind": "preemptions", "team": tenant, "since": since, "count": sum(h["times"] for h in hits),
                "jobs": hits[:10], "job_total": len(hits), "by_priority": by_priority, "items": []}

    def remember(self, text: str, trainer: str | None = None, job_id: str | None = None) -> dict:
        """Keep a note for the caller's tenant; a local or admin caller's go to the tenant of the job
        they cite, else to the default tenant (where its own jobs go)."""
        job = self._job(job_id) if job_id else None
        tenant = self.tenant or (job.tenant if job else self.queue.config.default_tenant)
        note = self.memory.remember(tenant, text, trainer=trainer, job_ids=[job.id] if job else [],
                                    run_ids=[job.mlflow_run_id] if job and job.mlflow_run_id else [])
        self._audit("memory.remember", note["id"], {"text": text[:200], "job_id": job_id}, tenant)
        return {**note, "memory_id": note["id"]}

    def _audit(self, action: str, target: str, params: dict, tenant: str | None) -> None:
        if self.queue.audit is not None:  # what the agent changed in its memory is an action like the rest
            self.queue.audit.record(self.actor(), action, target, params, tenant=tenant)

    def forget(self, item_id: str) -> dict:
        if item_id.lower() in REFERENCES:  # the agent resolves these from its thread
            raise NotFound("I haven't recalled or remembered anything in this conversation yet; say which "
                           "memory (its id) to forget", "item_id")
        forgotten = self.memory.forget(self.tenant, item_id)
        self._audit("memory.forget", item_id, {}, forgotten.get("tenant"))
        return {"forgotten": forgotten}

    # ------------------------------------------------------------------ the catalogue

    def catalog(self) -> dict[str, Tool]:
        specs = [
            ("trigger_training_job", f"Start training a catalogued trainer ({' or '.join(USER_TRAINERS)}) now, "
                                     "through the queue at normal priority.", TrainArgs),
            ("queue_training_job", "Queue a training job with a priority (high, normal, low).", QueueArgs),
            ("get_training_status", "State, progress and latest metrics of a job ('last' for the latest).", JobRef),
            ("get_job_queue_status", "The caller's waiting and running jobs, by state.", NoArgs),
            ("why_is_job_waiting", "Why a job waits ('last' for the latest): the blocking reason (quota, cohort, "
                                   "budget, capacity, packing, nodes, behind a reserved job...), its position in "
                                   "its priority class and an estimated start with an interval.", JobRef),
            ("cancel_job", "Cancel one job, or all of the caller's queued jobs (scope='queued').", CancelArgs),
            ("list_mlflow_experiments", "The MLflow experiments.", NoArgs),
            ("get_experiment_metrics", "Recent runs of an experiment with a metric, or one run's metrics.",
             MetricsArgs),
            ("calculate_training_cost", "The metered cost of a job (live while it runs).", JobRef),
            ("get_cost_report", "Spend grouped by tenant, trainer, day or state over a period.", ReportArgs),
            ("check_training_budget", "Spend plus running and queued forecasts against a budget.", BudgetArgs),
            ("forecast_training_cost", "Remaining time and final cost of a job, or the cost of a config not yet "
                                       "run, with a 90% interval.", ForecastArgs),
            ("recommend_cost_optimization", "Savings measured from a finished run and past runs.", AdviceArgs),
            ("get_gpu_availability", "GPUs free and used by node, queued GPU demand, and the nodes of each "
                                     "worker group (running, idle, starting, min, max).", NoArgs),
            ("validate_job_resources", "Would this trainer config fit the cluster and the caller's quota? Nothing "
                                       "is started.", TrainArgs),
            ("start_hyperparameter_search", "Queue a Ray Tune search over a trainer's config, with an optional budget.",
             SearchArgs),
            ("list_models", "Registered model versions (one model per trainer), their aliases, test metric and "
                            "cost, and which version is served.", ModelArgs),
            ("deploy_model", "Serve a registered model version or alias on Ray Serve; replicas roll over without "
                             "failed requests.", DeployArgs),
            ("recall", "What the platform remembers of the caller's tenant across conversations: notes, outcomes of "
                       "finished jobs (params, metric, cost), failure fingerprints with the jobs that had them, or "
                       "preemptions; each cites its job and MLflow run ids. E.g. 'has llm failed like this before?', "
                       "'what learning rate worked last time?'", RecallArgs),
            ("remember", "Keep a note for the caller's tenant across conversations, e.g. 'lr 0.003 works best for "
                         "mnist'.", RememberArgs),
            ("forget", "Forget one memory by its id, or 'that': the one last recalled or remembered.", ForgetArgs),
        ]
        return {name: Tool(name, desc, args, getattr(self, name)) for name, desc, args in specs}

    def call(self, name: str, args: dict) -> dict:
        """Validate `args` against the tool's schema, then run it. Unknown tools are refused."""
        tool = self.catalog().get(name)
        if tool is None:
            raise NotFound(f"there is no tool {name!r}; I can only use: {', '.join(self.catalog())}", "tool")
        try:
            parsed = tool.args(**(args or {}))
        except ValidationError as exc:
            where = [".".join(map(str, e["loc"])) or "args" for e in exc.errors()]
            problems = "; ".join(f"{w}: {e['msg']}" for w, e in zip(where, exc.errors()))
            raise ToolError(f"bad arguments for {name}: {problems}", where[0]) from None
        return tool.fn(**parsed.model_dump(exclude_unset=True))
