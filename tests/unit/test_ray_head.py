"""The local head's `ray start`: the dashboard loads only the configured modules and no Ray Client
server starts unless a port is set; Ray's own CLI does the rest."""
import sys

import pytest
from ray._private import node, ray_constants, services

from ray_apps import cluster, ray_head
from ray_apps.config import PROJECT_ROOT, RayHeadSettings, Settings
from ray_apps.topology import load_topology

TOPOLOGY = load_topology(PROJECT_ROOT / "configs" / "cluster.yaml")


@pytest.fixture
def started(monkeypatch):
    """Ray's process starter and client-server start, recorded instead of run (restored after)."""
    calls = []
    monkeypatch.setattr(services, "start_ray_process", lambda command, process_type, *a, **k: calls.append(
        (process_type, command)))
    monkeypatch.setattr(node.Node, "start_ray_client_server", lambda self: calls.append(("client", None)))
    return calls


def test_the_dashboard_gets_the_modules_and_other_processes_are_untouched(started):
    ray_head.patch_ray_start(["JobHead", "ServeHead"], client_server=True)
    services.start_ray_process(["python", "dashboard.py"], ray_constants.PROCESS_TYPE_DASHBOARD)
    services.start_ray_process(["raylet"], ray_constants.PROCESS_TYPE_RAYLET)
    assert started == [(ray_constants.PROCESS_TYPE_DASHBOARD,
                        ["python", "dashboard.py", "--modules-to-load=JobHead,ServeHead"]),
                       (ray_constants.PROCESS_TYPE_RAYLET, ["raylet"])]
    node.Node.start_ray_client_server(object())
    assert started[-1] == ("client", None)  # kept when asked for


def test_no_client_server_and_all_modules_leave_the_dashboard_as_ray_starts_it(started):
    ray_head.patch_ray_start(None, client_server=False)
    node.Node.start_ray_client_server(object())
    services.start_ray_process(["python", "dashboard.py"], ray_constants.PROCESS_TYPE_DASHBOARD)
    assert started == [(ray_constants.PROCESS_TYPE_DASHBOARD, ["python", "dashboard.py"])]


def test_ray_s_own_arguments_follow_the_separator(monkeypatch):
    seen = {}
    monkeypatch.setattr(ray_head, "patch_ray_start", lambda modules, client_server: seen.update(
        modules=modules, client_server=client_server))
    import ray.scripts.scripts as scripts
    monkeypatch.setattr(scripts, "main", lambda: seen.update(argv=list(sys.argv)) or 0)
    monkeypatch.setattr("sys.argv", ["x"])
    assert ray_head.main(["--dashboard-modules=JobHead,ServeHead", "--no-client-server", "--",
                          "start", "--head", "--port=6379"]) == 0
    assert seen == {"modules": ["JobHead", "ServeHead"], "client_server": False,
                    "argv": ["ray", "start", "--head", "--port=6379"]}


def test_the_head_command_loads_the_configured_modules_and_no_client_server():
    cmd = cluster.ray_head_command(Settings(), TOPOLOGY)
    assert cmd[cmd.index("-m") + 1] == "ray_apps.ray_head"
    assert "--dashboard-modules=JobHead,ServeHead,StateHead,ReportHead,NodeHead" in cmd
    assert "--no-client-server" in cmd and not any(c.startswith("--ray-client-server-port") for c in cmd)
    assert cmd.index("--") < cmd.index("start") < cmd.index("--head")

    every = Settings(ray=RayHeadSettings(dashboard_modules="all", client_server_port=10001))
    cmd = cluster.ray_head_command(every, TOPOLOGY)
    assert "--ray-client-server-port=10001" in cmd and "--no-client-server" not in cmd
    assert not any(c.startswith("--dashboard-modules") for c in cmd)


def test_modules_the_platform_needs_cannot_be_left_out():
    with pytest.raises(ValueError, match="the platform needs JobHead, ReportHead"):
        RayHeadSettings(dashboard_modules=["ServeHead", "NodeHead"])
    with pytest.raises(ValueError):
        RayHeadSettings(dashboard_modules=["JobHead", "ServeHead", "NoSuchHead"])
    assert RayHeadSettings(dashboard_modules=["JobHead", "ServeHead", "ReportHead", "JobHead"]).dashboard_modules == [
        "JobHead", "ServeHead", "ReportHead"]
