"""`oppen up` / `status` / `down` against real processes."""

import socket

import psutil
import pytest
import requests

from ray_apps import cluster
from ray_apps.cluster import PlatformError
from ray_apps.observability import prometheus
from ray_apps.processes import ServiceRegistry, port_holder, wait_until
from ray_apps.ray_client import ray_auth_headers

pytestmark = pytest.mark.slow


def test_second_up_reports_what_runs(platform):
    said = []
    rows = cluster.up(platform, say=said.append)
    assert any("ray: already running" in s for s in said)
    assert any("mlflow: already running" in s for s in said)
    assert any("serve: already running" in s for s in said)
    assert all(r.healthy for r in rows)
    # Serve lives inside Ray; Prometheus runs where its binary is installed (CI installs Debian's).
    expected = ["ray", "mlflow", "dispatcher"] + (["prometheus"] if prometheus.binary(platform) else [])
    assert [r.name for r in rows if r.managed] == expected
    res = cluster.cluster_resources(platform.dashboard_url)
    assert res.total["CPU"] >= 1 and res.total["GPU"] == 2
    # Ray frees a finished job's placement group a moment after the job ends (an earlier test's job
    # may just have finished): every declared GPU comes back within a bounded wait.
    assert wait_until(lambda: cluster.cluster_resources(platform.dashboard_url).free("GPU") == 2, timeout=30), \
        cluster.cluster_resources(platform.dashboard_url)


def test_port_held_by_someone_else_is_named(platform, tmp_path):
    other = platform.model_copy(update={"data_dir": tmp_path / "other"})  # nothing started there
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        other.mlflow = other.mlflow.model_copy(update={"port": port})
        with pytest.raises(PlatformError) as err:
            cluster.up(other, say=lambda s: None)
    msg = str(err.value)
    assert f"port {port} is held by pid" in msg and f"port {platform.ray.dashboard_port} is held" in msg
    assert "To fix" in msg
    assert cluster.status(other)[0].managed is False  # nothing was started for it


def test_serve_front_is_ray_s_haproxy_on_loopback_inside_ray_s_session(platform):
    holder = port_holder(platform.serve_port)
    assert holder is not None and holder.name == "haproxy", holder
    # In the Ray head's process session: `oppen down` stops it with the head.
    ray = ServiceRegistry(platform.state_dir).running()[cluster.RAY]
    haproxies = [p for p in ray.processes() if p.name() == "haproxy"]
    assert holder.pid in {p.pid for p in haproxies}
    listening = {(c.laddr.ip, c.laddr.port) for p in haproxies for c in p.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    proxy = platform.serve_proxy
    assert {port for _, port in listening} >= {platform.serve_port, proxy.stats_port, proxy.metrics_port}
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening  # stats and metrics too (the wrapper)
    routes = requests.get(f"{cluster.serve_url(platform)}/-/routes", timeout=10).json()
    assert set(routes) == {"/", "/v1/agent", "/v1/models"}


def test_eval_oppen_env_makes_ray_s_own_cli_work_in_a_fresh_shell(platform):
    import os
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", 'eval "$(oppen env)" && ray job list && echo "mlflow=$MLFLOW_TRACKING_URI"'],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mlflow={platform.tracking_uri}" in done.stdout
    # The exported address is this platform's own head: `oppen up/down` still treat it as local.
    assert platform.model_copy(update={"ray_address": platform.dashboard_url}).is_local


def test_every_listener_is_on_the_configured_host_and_the_state_is_private(platform):
    """Ray's GCS, raylet, agents, metrics, client server (where one runs), Serve replicas (HTTP and their internal
    gRPC), HAProxy, MLflow, the dispatcher and Prometheus: nothing listens beyond `host`. The data
    dir (databases, conversations) and Ray's temp dir are readable by their owner only."""
    from tests.integration.conftest import listeners_off_host

    # Each Serve app answers, so every replica has opened its servers.
    assert cluster.serve_healthy(platform)
    assert listeners_off_host(platform) == {}
    assert platform.data_dir.stat().st_mode & 0o777 == 0o700
    assert cluster.ray_temp_dir(platform).parent.stat().st_mode & 0o777 == 0o700
    for db in [platform.data_dir / "queue.db", platform.data_dir / "mlflow" / "mlflow.db"]:
        assert db.stat().st_mode & 0o077 == 0, (db, oct(db.stat().st_mode))


def test_rank_zeros_tracker_logs_over_mlflows_rest_api_what_mlflows_client_reads_back(platform):
    """RunTracker sends without MLflow's client (trainers.mlflow_calls.RestClient); the real server takes
    params, tags, a NaN metric at its step and a dataset input, and names a run it does not know."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import RunTracker

    client = MlflowClient(platform.tracking_uri)
    exp = (client.get_experiment_by_name("rest-tracker")
           or client.get_experiment(client.create_experiment("rest-tracker")))
    run_id = client.create_run(exp.experiment_id).info.run_id
    tracker = RunTracker(platform.tracking_uri, run_id)
    tracker.log_params({"lr": 0.1})
    tracker.set_tags({"oppen.phase.loop_at": "1.5"})
    tracker.log_metrics({"loss": 0.25, "diverged": float("nan")}, step=3)
    tracker.log_dataset({"name": "mnist", "digest": "d1", "source_type": "local", "source": "{}",
                         "schema": "", "profile": ""})
    assert tracker.flush() is True and tracker.unsent == 0, tracker.last_error
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags["oppen.phase.loop_at"] == "1.5"
    assert run.data.metrics["loss"] == 0.25 and run.data.metrics["diverged"] != run.data.metrics["diverged"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["d1"]

    unknown = RunTracker(platform.tracking_uri, "0" * 32)
    unknown.log_metrics({"loss": 1.0}, step=1)
    assert unknown.flush() is False and unknown.unsent == 1
    assert "RESOURCE_DOES_NOT_EXIST" in unknown.last_error


def test_a_run_opened_closed_and_reopened_over_mlflows_rest_api_reads_back_as_mlflows_client_sees_it(platform):
    """The queue's and the trainers' runs are opened without MLflow's client (trainers.tracking): a new
    experiment, the run's name and tags in its creating request, its end, and its reopening."""
    import uuid

    from mlflow.tracking import MlflowClient

    from trainers.driver import close_run
    from trainers.tracking import open_new_run, open_run

    client, name = MlflowClient(platform.tracking_uri), f"rest-{uuid.uuid4().hex[:8]}"
    run_id, experiment_id = open_new_run(platform.tracking_uri, experiment=name, run_name="job-1",
                                         tags={"oppen.tenant": "team-a", "attempt": 1})
    run = client.get_run(run_id)
    assert client.get_experiment(experiment_id).name == name and run.info.experiment_id == experiment_id
    assert run.info.run_name == "job-1" and run.info.status == "RUNNING"
    assert run.data.tags["oppen.tenant"] == "team-a" and run.data.tags["attempt"] == "1"

    close_run(platform.tracking_uri, run_id, status="FAILED")
    assert client.get_run(run_id).info.status == "FAILED" and client.get_run(run_id).info.end_time
    assert open_run(platform.tracking_uri, experiment=name, run_name="job-1", run_id=run_id,
                    tags={"attempt": 2}) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempt"] == "2" and run.info.run_name == "job-1"
    assert open_run(platform.tracking_uri, experiment=name, run_name="job-2") != run_id  # found by name
    assert len(client.search_runs([experiment_id])) == 2


def test_a_finished_search_closes_its_trials_runs_over_mlflows_rest_api(platform):
    import uuid

    from tests.unit.test_tune_runs import closes_trials_as_they_ended

    closes_trials_as_they_ended(platform.tracking_uri, f"tune-{uuid.uuid4().hex[:8]}")


def test_the_head_runs_only_the_configured_dashboard_modules_and_no_ray_client_server(platform):
    """Each dashboard module is a process of its own (~90 MB); the platform's settings name them."""
    ray = ServiceRegistry(platform.state_dir).running()[cluster.RAY]
    titles = [" ".join(p.cmdline()) for p in ray.processes()]
    modules = {t.split()[0].removeprefix("ray-dashboard-").rsplit("-", 1)[0] for t in titles
               if t.startswith("ray-dashboard-")}
    assert modules == set(platform.ray.dashboard_modules), titles
    assert not [t for t in titles if "ray_client_server" in t or "ray.util.client.server" in t], titles
    # What the platform reads through them still answers: jobs, Serve, cluster status, state API.
    assert cluster.cluster_resources(platform.dashboard_url).total["GPU"] == 2
    assert cluster.serve_healthy(platform)
    nodes = requests.get(f"{platform.dashboard_url}/api/v0/nodes", timeout=10,
                         headers=ray_auth_headers()).json()
    assert nodes["result"] is True and nodes["data"]["result"]["total"] >= 1, nodes
