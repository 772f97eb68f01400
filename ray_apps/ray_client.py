"""Talking to a Ray cluster at an address (its token, Jobs API and resources) and to MLflow.

Everything that needs Ray (the queue, costs, agent, Serve apps) imports this module,
never `ray_apps.cluster` (the local platform's start-up), so the same code runs
against a head on this machine or a KubeRay head: the Ray address is the one switch.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from trainers.errors import Unavailable


class PlatformError(Unavailable):
    """The platform could not be started or reached; the message says why and what to do."""


@dataclass
class Resources:
    total: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    by_node: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # node -> res -> (used, total)

    def free(self, name: str) -> float:
        return self.total.get(name, 0.0) - self.used.get(name, 0.0)

    def node_totals(self) -> list[dict[str, float]]:
        """Each node's total CPUs and GPUs: what the cluster could ever give a job."""
        return [{"CPU": u.get("CPU", (0, 0))[1], "GPU": u.get("GPU", (0, 0))[1]} for u in self.by_node.values()]

    def node_free(self) -> list[dict[str, float]]:
        return [{k: u.get(k, (0, 0))[1] - u.get(k, (0, 0))[0] for k in ("CPU", "GPU")} for u in self.by_node.values()]


def http_get(url: str, *, timeout: float = 3.0, headers: dict | None = None) -> bytes | None:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ray_token() -> str | None:
    """Where Ray's own clients look: $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        try:
            token = _token_path().read_text().strip()
        except OSError:
            return None
    return token or None


def ensure_ray_token() -> None:
    """The local head runs with token auth (its GCS listens beyond loopback): make a token once."""
    if ray_token() is None:
        path = _token_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)


def use_ray_token() -> None:
    """Ray's Python clients send the token only when RAY_AUTH_MODE=token is set in the
    process; set it whenever a token exists (an explicit RAY_AUTH_MODE wins)."""
    if ray_token() is not None and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:  # Ray read its config at import: refresh it
            from ray._raylet import Config

            Config.initialize("")


def ray_auth_headers() -> dict[str, str]:
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_healthy(dashboard_url: str) -> bool:
    return http_get(f"{dashboard_url}/api/version", headers=ray_auth_headers()) is not None


def cluster_resources(dashboard_url: str) -> Resources:
    """CPUs, GPUs... total and in use, cluster-wide and per node, from the dashboard."""
    body = http_get(f"{dashboard_url}/api/cluster_status", timeout=5, headers=ray_auth_headers())
    if body is None:
        raise PlatformError(f"Ray at {dashboard_url} does not answer. To fix: run `oppen up` or set RAY_ADDRESS.")
    report = json.loads(body)["data"]["clusterStatus"]["loadMetricsReport"]
    res = Resources()
    for name, (used, total) in report.get("usage", {}).items():
        res.used[name], res.total[name] = float(used), float(total)
    for node, usage in (report.get("usageByNode") or {}).items():
        res.by_node[node] = {k: (float(u), float(t)) for k, (u, t) in usage.items()}
    return res


def mlflow_healthy(tracking_uri: str, timeout: float = 3.0) -> bool:
    return http_get(f"{tracking_uri}/health", timeout=timeout) is not None


def job_client(dashboard_url: str):
    """Ray's Jobs API client, with the token when there is one."""
    from ray.job_submission import JobSubmissionClient

    use_ray_token()
    return JobSubmissionClient(dashboard_url)
