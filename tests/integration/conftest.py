"""A real platform for integration tests: `oppen up` on test ports, stopped by PID after.

The ports and data dir differ from the defaults so a developer's own platform can
keep running beside the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ray_apps import cluster
from ray_apps.config import load_settings

# Short preemption wait and fast cycles so scheduling tests take seconds.
QUEUE_CONFIG = {"priorities": {"high": {"rank": 2, "preempt_after_s": 2}, "normal": {"rank": 1},
                               "low": {"rank": 0}},
                "tenants": {"team-a": {"gpus": 2}, "team-c": {"gpus": 1}, "team-s": {"cpus": 1}}, "poll_s": 0.3,
                "preemption": {"drain_grace_s": 20},
                "submit_rate_per_minute": 60}
TENANT_TOKENS = {"token-a": "team-a", "token-b": "team-b", "token-admin": {"tenant": "ops", "role": "admin"},
                 "token-view": {"tenant": "team-a", "role": "viewer"}, "token-fuzz": "team-fuzz"}
TEST_PORTS = {"gcs_port": 6479, "dashboard_port": 8365, "metrics_export_port": 8180,
              "dashboard_agent_port": 52465}
TEST_PROXY_PORTS = {"stats_port": 8414, "metrics_port": 9111, "fallback_port": 8510}


def write_platform(root: Path, mnist_cache: Path, queue_config: dict, settings: dict) -> Path:
    """A platform's files under `root`: its data dir (with the cached MNIST), platform.yaml and
    queue.yaml. Returns the settings file."""
    data_dir = root / "data"
    (data_dir / "datasets").mkdir(parents=True)
    for name in ("mnist.npz", "mnist.json"):
        shutil.copy(mnist_cache / "datasets" / name, data_dir / "datasets" / name)
    (root / "queue.yaml").write_text(yaml.safe_dump(queue_config))
    config = root / "platform.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data_dir), **settings}))
    return config


@pytest.fixture(scope="session")
def platform(tmp_path_factory, mnist_cache):
    """Settings of a running local platform (Ray head with 2 logical GPUs + MLflow)."""
    root = tmp_path_factory.mktemp("platform")
    config = write_platform(root, mnist_cache, QUEUE_CONFIG, {
        "ray": TEST_PORTS, "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5100},
        "serve_port": 8100, "metrics_port": 9564, "serve_proxy": TEST_PROXY_PORTS, "prometheus": {"port": 9190}})
    # The dispatcher and Serve apps that `up` starts read settings, queue config and
    # tenant tokens from the environment they inherit.
    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(config), str(root)
    os.environ["OPPEN_TENANT_TOKENS"] = json.dumps(TENANT_TOKENS)
    settings = load_settings(config)
    t0 = time.monotonic()
    cluster.up(settings, timeout=120)
    cluster.use_ray_token()  # as a user's `export RAY_AUTH_MODE=token` does for Ray's own clients
    print(f"platform healthy in {time.monotonic() - t0:.1f} s")
    try:
        yield settings
    finally:
        cluster.down(settings)


def job_logs(settings, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(settings.dashboard_url).get_job_logs(submission_id)


def wait_for_log(settings, submission_id: str, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in job_logs(settings, submission_id):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in the logs of {submission_id} after {timeout} s")


def listeners_off_host(settings) -> dict[tuple[str, int], str]:
    """Every TCP listener of the platform's processes (each service's whole session) that is not on
    the configured host, with the process that holds it (read from /proc/net/tcp*)."""
    from ray_apps.processes import ServiceRegistry, listening_sockets

    allowed = {settings.host, f"::ffff:{settings.host}"}
    off = {}
    for service in ServiceRegistry(settings.state_dir).running().values():
        for proc in service.processes():
            for address in listening_sockets([proc.pid]):
                if address[0] not in allowed:
                    with contextlib.suppress(psutil.Error):
                        off[address] = f"{service.name}: {proc.name()}"
    return off
