"""The MNIST job on a real local Ray head and MLflow server, through the Jobs API."""

from __future__ import annotations

import json
import re

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from ray_apps import cluster, processes
from ray_apps.config import PROJECT_ROOT
from ray_apps.serve.served_models import load_mnist_version
from ray_apps.training import WORKING_DIR_EXCLUDES, follow, submit_training
from tests.integration.conftest import job_logs, wait_for_log
from trainers.data import load_mnist
from trainers.mnist_model import to_tensors
from trainers.pricing import load_catalog
from trainers.registry import get_version

pytestmark = pytest.mark.slow
# Big enough to learn (> 0.8 after 2 epochs), small enough that start-up dominates.
SMALL = {"train_samples": 3000, "test_samples": 500}


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in (proc.info["cmdline"] or [])):
            pids.append(proc.info["pid"])
    return pids


def test_mnist_job_life_worker_killed_everything_logged_then_resumed_by_plain_ray_job_submit(platform):
    """One job's life in three acts (each real Ray Train start costs ~40 s here): a killed worker is
    replaced from a checkpoint; the run logs params, metrics, cost and a loadable model; a later plain
    `ray job submit ... --resume` (env from the head, no platform) continues the same run."""
    sub = submit_training(platform, "mnist", {"epochs": 3, **SMALL}, metadata={"tenant": "team-a"})
    # Kill only once Ray Train has registered the first checkpoint (its snapshot file says so).
    snapshot = platform.data_dir / "checkpoints" / sub.submission_id / "checkpoint_manager_snapshot.json"
    assert processes.wait_until(lambda: snapshot.exists() and '"checkpoint_results":[{' in snapshot.read_text(),
                                timeout=180, interval=0.2)
    victims = _train_worker_pids()
    assert victims, "no Ray Train worker process found"
    for pid in victims:
        psutil.Process(pid).kill()
    progress = []
    outcome = follow(platform, sub.submission_id, on_progress=progress.append, poll_s=0.5)
    assert outcome.ok, "\n".join(outcome.log_tail)
    starts = [int(n) for n in re.findall(r"start_epoch=(\d+)", job_logs(platform, sub.submission_id))]
    assert starts[0] == 0 and max(starts) >= 1  # the new group started from a checkpoint, not epoch 0
    assert all(any(f"epoch {e}/3" in p for p in progress) for e in (1, 2, 3)), [p for p in progress if "epoch" in p]

    ray_jobs = JobSubmissionClient(platform.dashboard_url)
    info = ray_jobs.get_job_info(sub.submission_id)
    assert info.metadata["mlflow_run_id"] == sub.mlflow_run_id and info.metadata["tenant"] == "team-a"
    # Ray Train's controller ran in the job's driver (trainers/train_controller.py), no actor of its
    # own, and still replaced the killed worker.
    classes = [a.class_name for a in list_actors(address=platform.dashboard_url, limit=1000,
                                                 filters=[("job_id", "=", info.job_id)])]
    assert classes.count("RayTrainWorker") >= 2 and "TrainController" not in classes

    client = MlflowClient(platform.tracking_uri)
    run = client.get_run(sub.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == "3" and params["width"] == "16"
    assert params["train_samples"] == str(SMALL["train_samples"])
    assert params["data_source"].startswith(("pypi:", "hf:")) and params["device"] == "cpu"
    assert run.data.tags["ray.submission_id"] == sub.submission_id and run.data.tags["oppen.tenant"] == "team-a"

    acc = metric_steps(client, sub.mlflow_run_id, "test_accuracy")
    assert sorted(acc) == [1, 2, 3] and acc[3] > 0.8

    # The finished run is a new version of the registered model `mnist`, tagged with its accuracy.
    version = client.get_model_version("mnist", outcome.result["model_version"])
    assert version.run_id == sub.mlflow_run_id and float(version.tags["test_accuracy"]) == pytest.approx(acc[3])
    loss = metric_steps(client, sub.mlflow_run_id, "train_loss")
    assert loss[3] < loss[1]

    # Cost = allocation (1 worker x 2 CPUs, 0 GPUs) x catalog rate x measured time, across the restart.
    elapsed = metric_steps(client, sub.mlflow_run_id, "elapsed_s")
    cost = metric_steps(client, sub.mlflow_run_id, "cost_usd")
    rate = load_catalog(platform.costs_file).cpu_core_hour
    for step in (1, 2, 3):
        assert cost[step] == pytest.approx(2 * rate * elapsed[step] / 3600, rel=1e-9)
    assert cost[3] > cost[2] > cost[1] > 0
    assert metric_steps(client, sub.mlflow_run_id, "cost_gpu_usd")[3] == 0
    assert outcome.result["cost_usd"] == pytest.approx(cost[3])

    # The registered weights load back over HTTP, as a Serve replica loads them, and score what
    # training reported.
    model = load_mnist_version(platform.tracking_uri, get_version(platform.tracking_uri, "mnist", version.version))
    data = load_mnist(platform.data_dir)
    n = SMALL["test_samples"]
    x, y = to_tensors(data.test_images[:n], data.test_labels[:n])
    with torch.no_grad():
        served_acc = float((model(x).argmax(1) == y).float().mean())
    assert served_acc == pytest.approx(acc[3], abs=1e-6)

    # Resumed later for one more epoch, with nothing but Ray's own job API.
    again = ray_jobs.submit_job(
        entrypoint=f"python -m trainers.mnist --run-name {sub.submission_id} --epochs 4 --resume",
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES})
    resumed = follow(platform, again, on_progress=lambda _: None, poll_s=0.5)
    assert resumed.ok, "\n".join(resumed.log_tail)
    logs = job_logs(platform, again)
    assert "start_epoch=3" in logs and "epoch 3/4" not in logs and "epoch 4/4" in logs
    assert resumed.result["mlflow_run_id"] == sub.mlflow_run_id and resumed.result["tracking_lost"] is None
    assert sorted(metric_steps(client, sub.mlflow_run_id, "test_accuracy")) == [1, 2, 3, 4]
    elapsed = metric_steps(client, sub.mlflow_run_id, "elapsed_s")
    assert elapsed[4] > elapsed[3]  # cost keeps counting across the two segments
    tags = client.get_run(sub.mlflow_run_id).data.tags
    assert tags["oppen.resumed_from_epoch"] == "3" and json.loads(tags["oppen.resume_overrides"]) == {"epochs": 4}


def test_mlflow_going_away_does_not_kill_training(platform, tmp_path):
    port = 5171
    own = platform.model_copy(update={"data_dir": tmp_path})
    own.mlflow = own.mlflow.model_copy(update={"port": port})
    server = processes.spawn("mlflow2", cluster.mlflow_command(own), log_path=tmp_path / "mlflow2.log",
                             env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        uri = f"http://127.0.0.1:{port}"
        assert processes.wait_until(lambda: cluster.mlflow_healthy(uri), timeout=60)
        doomed = platform.model_copy(update={"mlflow_tracking_uri": uri})
        sub = submit_training(doomed, "mnist", {"epochs": 3, **SMALL})
        wait_for_log(platform, sub.submission_id, "epoch 1/3")
        processes.stop(server)
        outcome = follow(platform, sub.submission_id, on_progress=lambda _: None, poll_s=0.5)
    finally:
        processes.stop(server)
    assert outcome.ok, "\n".join(outcome.log_tail)
    assert outcome.result["epochs"] == 3 and outcome.result["test_accuracy"] > 0.8
    assert "MLflow tracking lost" in outcome.result["tracking_lost"]
    assert "MLflow tracking lost" in job_logs(platform, sub.submission_id)
