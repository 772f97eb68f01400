"""What every HTTP app of the platform shares: problem bodies, the body-size limit, callers and roles."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_apps.audit import Actor
from ray_apps.auth import AuthError, Caller, Role, Users
from ray_apps.config import is_loopback
from trainers.errors import KINDS, OppenError

MAX_BODY_BYTES = 64 * 1024

# The Serve apps answer people: an MLflow that stalls is "unavailable" after 2 s (MLflow's client
# waits 120 s and retries 7 times by default). Training jobs keep MLflow's patient defaults. Set, not
# defaulted: a replica inherits the environment of whatever started Ray, which may have configured
# MLflow for itself (trainers.tracking.configure_http: 10 s).
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


def _internal_grpc_on_node_address() -> None:
    """Serve replicas open a gRPC server for calls between deployments on `[::]:0`, every interface,
    with no setting for its host (Ray 2.60, replica.py). Every replica imports this module (each
    deployment's module does), so the server is bound to the node's own address instead: on a
    loopback head that is loopback; on a cluster, the pod's address that other nodes dial."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "on_node_address", False):
        return

    def on_node_address(server, address: str):
        import ray

        if address.startswith("[::]:") and ray.is_initialized():
            host = ray.util.get_node_ip_address()
            address = f"[{host}]:{address[5:]}" if ":" in host else f"{host}:{address[5:]}"
        return bind(server, address)

    on_node_address.on_node_address = True
    replica.add_port_to_grpc_server = on_node_address


_internal_grpc_on_node_address()

# Every Serve replica lives on the head (0 CPU, a sliver of the head's own node resource): one on a
# worker node would keep that node busy, and the autoscaler would never scale its group down.
ON_HEAD_NODE = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


class InProcess:
    """A deployment's class run inside the calling replica, called like its handle
    (`await target.method.remote(*args)`): its blocking methods run on a worker thread."""

    def __init__(self, target: object):
        self._target = target

    def __getattr__(self, name: str):
        method = getattr(self._target, name)

        class _Call:
            @staticmethod
            async def remote(*args, **kwargs):
                return await asyncio.to_thread(method, *args, **kwargs)

        return _Call


class _RootWithoutSlash:
    """`POST /v1/agent` answers like `POST /v1/agent/`: the app's root route is matched without the
    307 redirect that clients which do not re-send a POST (Python's urllib, many SDKs) cannot follow."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        root = scope.get("root_path", "")
        if scope["type"] == "http" and root and scope["path"] in (root, ""):
            scope = {**scope, "path": root + "/", "raw_path": (root + "/").encode()}
        await self.app(scope, receive, send)


def root_without_slash(app: FastAPI) -> None:
    app.add_middleware(_RootWithoutSlash)


class ProblemDetail(BaseModel):
    kind: str = Field(description=", ".join([*KINDS, "wrong_host"]))
    field: str | None = Field(description="the input at fault, e.g. params.epochs, job_id, Authorization")
    reason: str = Field(description="what is wrong and, where it helps, how to fix it")


class Problem(BaseModel):
    """Every error any app of the platform answers, whatever its status."""

    detail: ProblemDetail


def problem_response(status: int, kind: str, field: str | None, reason: str,
                     headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"detail": {"kind": kind, "field": field, "reason": reason}})


def _error_answer(request: Request, exc: OppenError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return problem_response(exc.status, exc.kind, exc.field, str(exc), headers)


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks (types, bounds, unknown keys) answer in the platform's shape: one field,
    named as the client wrote it (`params.epochs`, `limit`), and why."""
    found = exc.errors()
    first = found[0] if found else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ())]
    field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc) or None
    more = len(found) - 1
    reason = first.get("msg", "invalid") + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else "")
    return problem_response(422, "refused", field, reason)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's own answers (no such path, method not allowed) and a body that is not JSON at all
    (400), in the same shape."""
    kind = {404: "not_found"}.get(exc.status_code, "refused")
    field = "body" if exc.status_code == 400 else None
    return problem_response(exc.status_code, kind, field, str(exc.detail), getattr(exc, "headers", None))


# What every route may answer besides its own statuses: a body that does not parse (400, routes
# with a body), the gate (401/403), the body limit (413),
# the Host check (421), request validation (422) and a dependency that is down (503).
COMMON_ERRORS = {400: "the body is not JSON", 401: "no token, or an unknown one",
                 403: "the caller's role or tenant may not do this",
                 413: "request body too large", 421: "the Host header names another machine",
                 422: "a refused input: the field and why", 503: "Ray or MLflow is unavailable; retry shortly"}


def answers_errors_as_problems(app: FastAPI, *, public: tuple[str, ...] = ()) -> None:
    """One error model for the app: every OppenError, request validation and routing error answers
    `{"detail": {"kind", "field", "reason"}}` with its status; the OpenAPI schema says so for every
    route (its own statuses, declared with `errors(...)`, plus COMMON_ERRORS)."""
    app.add_exception_handler(OppenError, _error_answer)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    mlflow_unavailable_is_503(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _document_problems(schema, public)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def errors(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route's own error statuses (404, 409, 429, ...), all with the Problem body."""
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses}


def _document_problems(schema: dict, public: tuple[str, ...]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ProblemDetail, Problem):
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            has_body = "requestBody" in operation
            common = {s: d for s, d in COMMON_ERRORS.items()
                      if not (path in public and s in (401, 403)) and not (s in (400, 413) and not has_body)}
            for status, description in common.items():
                responses.setdefault(str(status), {"description": description})
            for status, response in responses.items():
                if status[:1] in "45":
                    response["content"] = body


class _BodyLimit:
    """Reads the body before the app does and answers 413 as soon as it passes `max_bytes`, whether
    it came with a Content-Length or chunked: nothing parses an oversized body, nor waits for all of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(send)
        body = b"".join(chunks)
        return await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}],
                                             then=receive), send)

    async def _refuse(self, send) -> None:
        response = problem_response(413, "too_large", "body", f"request body over {self.max_bytes} bytes",
                                    {"Connection": "close"})
        await response({"type": "http"}, _replay([]), send)


def _replay(messages: list[dict], then=None):
    async def receive():
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()  # after the body: e.g. http.disconnect
        return {"type": "http.disconnect"}
    return receive


def limit_body_size(app: FastAPI, max_bytes: int = MAX_BODY_BYTES) -> None:
    """Refuse bodies over `max_bytes` by the bytes read (chunked bodies too), before anything parses them."""
    app.add_middleware(_BodyLimit, max_bytes=max_bytes)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class _LoopbackHostsOnly:
    """On a loopback platform a request must name this machine in `Host`: a web page whose name was
    rebound to 127.0.0.1 (DNS rebinding) sends its own name and is refused. No Host at all (HTTP/1.0,
    HAProxy's health checks) cannot come from a browser and passes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        host = dict(scope.get("headers") or []).get(b"host") if scope["type"] == "http" else None
        if host is not None and _hostname(host.decode("latin-1")) not in LOOPBACK_NAMES:
            response = problem_response(421, "wrong_host", "Host", "this platform answers only to 127.0.0.1 or localhost")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_hosts_only(app: FastAPI, host: str) -> None:
    """Installed when the platform's `host` is loopback; a public platform is reached by its own names."""
    if is_loopback(host):
        app.add_middleware(_LoopbackHostsOnly)


def mlflow_unavailable_is_503(app: FastAPI) -> None:
    """MLflow down or stalled: a 503 saying so, on every route that needed it (not a 500 or a hang)."""
    app.add_middleware(_MlflowUnavailable)


class _MlflowUnavailable:
    """A middleware rather than exception handlers keyed by MLflow's classes: those would import MLflow
    (~100 MB) into every app at start, where only some routes use it and only when asked."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if started or not mlflow_unreachable(exc):
                raise
            response = problem_response(503, "unavailable", None, "MLflow is unavailable (the tracking server does "
                                        "not answer); try again shortly. To fix: `oppen status`, then `oppen up` "
                                        "to restart what is down.", {"Retry-After": "10"})
            await response(scope, receive, send)


def mlflow_unreachable(exc: BaseException) -> bool:
    """MLflow's client failed to reach its server; its other errors (not found, bad input) are answers.
    Either library raised it, so it is imported already: nothing is imported to ask."""
    mlflow_errors, requests_errors = sys.modules.get("mlflow.exceptions"), sys.modules.get("requests.exceptions")
    if mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException):
        return "API request to" in str(exc)
    return requests_errors is not None and isinstance(exc, requests_errors.RequestException)


def caller_of(users: Users, authorization: str | None, *, role: Role = Role.VIEWER, action: str = "this") -> Caller:
    """The request's caller with at least `role`; raises Unauthenticated or Forbidden (a 401/403)."""
    caller = users.authenticate(authorization)
    caller.require(role, action)
    return caller


def actor_of(caller: Caller, request: Request, front_end: str = "rest") -> Actor:
    """The caller as the audit log names them, with the HTTP client's address."""
    return Actor(caller.user, caller.tenant, front_end, request.client.host if request.client else None)


@functools.cache
def settings_users() -> Users:
    """The platform's users as this process's settings name them (users.json is re-read on change)."""
    from ray_apps.config import load_settings

    return Users.from_settings(load_settings())


def require_token(app: FastAPI, users: Callable[[], Users], public: tuple[str, ...]) -> None:
    """With tokens configured every path but `public` ones (health checks, a page without data) needs
    a valid token, the API docs and schema included; the routes then check the caller's role."""

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        path = request.url.path[len(request.scope.get("root_path", "")):] or "/"
        if path not in public:
            try:
                users().authenticate(request.headers.get("authorization"))
            except AuthError as exc:
                return _error_answer(request, exc)
        return await call_next(request)
