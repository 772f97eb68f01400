"""What every HTTP app of the platform shares: problem bodies, the body-size limit, callers and roles."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from ray_apps.auth import AuthError, Caller, Role, Users
from ray_apps.config import is_loopback

MAX_BODY_BYTES = 64 * 1024

# The Serve apps answer people: an MLflow that stalls is "unavailable" after 2 s (MLflow's client
# waits 120 s and retries 7 times by default). Training jobs keep MLflow's patient defaults.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


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


def problem(status: int, field: str | None, reason: str) -> HTTPException:
    """A 4xx whose body names the offending field and the reason."""
    return HTTPException(status_code=status, detail={"field": field, "reason": reason})


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
        response = JSONResponse(status_code=413, content={"detail": {
            "field": "body", "reason": f"request body over {self.max_bytes} bytes"}}, headers={"Connection": "close"})
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
            response = JSONResponse(status_code=421, content={"detail": {
                "field": "Host", "reason": "this platform answers only to 127.0.0.1 or localhost"}})
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
    import requests
    from mlflow.exceptions import MlflowException

    def unavailable(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, MlflowException) and "API request to" not in str(exc):
            raise exc  # an MLflow answer (not found, bad input): the route's own handling applies
        return JSONResponse(status_code=503, headers={"Retry-After": "10"}, content={"detail": {
            "field": None, "reason": "MLflow is unavailable (the tracking server does not answer); try again "
                                     "shortly. To fix: `oppen status`, then `oppen up` to restart what is down."}})

    app.add_exception_handler(MlflowException, unavailable)
    app.add_exception_handler(requests.exceptions.RequestException, unavailable)


def caller_of(users: Users, authorization: str | None, *, role: Role = Role.VIEWER, action: str = "this") -> Caller:
    """The request's caller with at least `role`, or a 401/403 problem."""
    try:
        caller = users.authenticate(authorization)
        caller.require(role, action)
        return caller
    except AuthError as exc:
        raise problem(exc.status, "Authorization", str(exc)) from None


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
                return JSONResponse(status_code=exc.status, content={"detail": {
                    "field": "Authorization", "reason": str(exc)}}, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)
