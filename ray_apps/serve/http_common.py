"""What every HTTP app of the platform shares: problem bodies, the body-size limit, tenant tokens."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

MAX_BODY_BYTES = 64 * 1024


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


def limit_body_size(app: FastAPI, max_bytes: int = MAX_BODY_BYTES) -> None:
    """Refuse bodies over `max_bytes` by their Content-Length, before anything parses them."""

    @app.middleware("http")
    async def _limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return JSONResponse(status_code=413, content={"detail": {
                "field": "body", "reason": f"request body over {max_bytes} bytes"}})
        return await call_next(request)


def tenant_of(tokens: dict[str, str], authorization: str | None) -> str | None:
    """None when no tokens are configured (loopback-only mode); else the token's tenant, or a 401."""
    if not tokens:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    for known, tenant in tokens.items():
        if scheme.lower() == "bearer" and secrets.compare_digest(token, known):
            return tenant
    raise problem(401, "Authorization", "a valid `Bearer <token>` of a tenant is required")
