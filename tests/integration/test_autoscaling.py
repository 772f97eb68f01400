"""A real autoscaling cluster on this machine: Ray's autoscaler with the fake multi-node provider
starts each worker node as a raylet, and the queue works with it (scale up, admit, withdraw, scale
down; preempt only at the group's maximum; refuse what no group can ever hold).

Its own platform on its own ports (no Serve apps, no Prometheus), beside the session's single-head
one, stopped by PID when the module ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import psutil
import pytest
import yaml

from ray_apps import cluster
from ray_apps.config import load_settings
from ray_apps.processes import wait_until
from ray_apps.scheduler.api import Infeasible, Queue
from ray_apps.scheduler.config import load_queue_config
from ray_apps.scheduler.states import JobState
from tests.integration.conftest import listeners_off_host, job_logs, write_platform

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_S = 10
TOPOLOGY = {"head": {"cpus": 0}, "idle_timeout_s": IDLE_TIMEOUT_S,
            "worker_groups": [{"name": "cpu", "cpus": 2, "memory_gib": 1, "min_workers": 1, "max_workers": 2},
                              {"name": "gpu", "cpus": 1, "gpus": 1, "memory_gib": 1, "min_workers": 0,
                               "max_workers": 2}]}
QUEUE = {"priorities": {"high": {"rank": 2, "preempt_after_s": 1}, "normal": {"rank": 1}, "low": {"rank": 0}},
         "poll_s": 0.3}
PORTS = {"gcs_port": 6679, "dashboard_port": 8665, "metrics_export_port": 8380, "dashboard_agent_port": 52665}


@pytest.fixture(scope="module")
def scaling(tmp_path_factory, mnist_cache):
    root = tmp_path_factory.mktemp("scaling")
    (root / "cluster.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    config = write_platform(root, mnist_cache, QUEUE, {
        "ray": PORTS, "cluster_file": str(root / "cluster.yaml"), "mlflow": {"port": 5250}, "metrics_port": 9664,
        "serve_port": 8250, "serve_proxy": {"stats_port": 8434, "metrics_port": 9131, "fallback_port": 8530},
        "prometheus": {"enabled": False}})
    saved = {k: os.environ.get(k) for k in ("OPPEN_CONFIG", "OPPEN_CONFIG_DIR")}
    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(config), str(root)  # for the dispatcher
    settings = load_settings(config)
    try:
        cluster.up(settings, serve=False, timeout=120, say=print)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    cluster.use_ray_token()
    queue = Queue.from_settings(settings, load_queue_config(root / "queue.yaml"))
    try:
        assert wait_until(lambda: queue.capacity().groups["cpu"].joined == 1, timeout=60), "no CPU node joined"
        yield queue
    finally:
        cluster.down(settings)


def state(queue: Queue, job_id: str) -> JobState:
    return queue.get(job_id).state


def joined(queue: Queue, group: str) -> int:
    return queue.capacity().groups[group].joined


def probe(queue: Queue, *, gpus=1, workers=1, seconds=60, priority="normal") -> str:
    return queue.submit("probe", {"num_workers": workers, "cpus_per_worker": 1, "gpus_per_worker": gpus,
                                  "seconds": seconds}, priority=priority).id


def finish(queue: Queue, *job_ids: str) -> None:
    for job_id in job_ids:
        if not queue.get(job_id).state.is_terminal():
            queue.cancel(job_id)
    # Ray stops the cancelled probes within seconds; their GPUs must be free before the next test.
    assert wait_until(lambda: queue.capacity().resources.used.get("GPU", 0) == 0, timeout=60)


def test_a_request_beyond_every_group_s_maximum_is_refused_in_under_a_second(scaling):
    for params in ({"num_workers": 3, "gpus_per_worker": 1},      # 3 GPUs; the group stops at 2 nodes
                   {"num_workers": 1, "gpus_per_worker": 2},      # 2 GPUs on one node; nodes have 1
                   {"num_workers": 1, "cpus_per_worker": 3}):     # no node type has 3 CPUs
        t0 = time.monotonic()
        with pytest.raises(Infeasible) as err:
            scaling.submit("probe", {"seconds": 1, **params})
        assert time.monotonic() - t0 < 1.0
        assert "rejected" in str(err.value)
    # Within the maxima, though nothing of it runs now: accepted (the GPU group is at 0).
    assert joined(scaling, "gpu") == 0
    assert scaling.validate("probe", {"num_workers": 2, "gpus_per_worker": 1}).ok


def test_a_gpu_job_scales_the_gpu_group_from_zero_and_the_node_goes_when_idle(scaling):
    assert joined(scaling, "gpu") == 0
    t0 = time.monotonic()
    job = probe(scaling, seconds=4)
    assert wait_until(lambda: state(scaling, job) is JobState.RUNNING, timeout=60), scaling.get(job)
    admitted_after = time.monotonic() - t0
    # Ray calls the job RUNNING once its driver starts; the autoscaler's report may trail its node by a beat.
    assert wait_until(lambda: joined(scaling, "gpu") == 1, timeout=20), scaling.capacity().groups
    # A worker node started by Ray's autoscaler listens on the head's host too (raylet, agents, job workers).
    assert listeners_off_host(scaling.settings) == {}
    assert wait_until(lambda: state(scaling, job) is JobState.SUCCEEDED, timeout=60), scaling.get(job)
    events = [e.message for e in scaling.store.events(job)]
    assert any("admitted" in m for m in events)
    # The request is withdrawn at admission, so once idle the node goes after the idle timeout.
    t_done = time.monotonic()
    assert wait_until(lambda: joined(scaling, "gpu") == 0, timeout=IDLE_TIMEOUT_S + 30, interval=1)
    print(f"scale-up to RUNNING {admitted_after:.1f} s; node gone {time.monotonic() - t_done:.1f} s after the job")


def test_below_the_maximum_a_high_job_scales_at_the_maximum_it_preempts(scaling):
    low = probe(scaling, priority="low", seconds=120)
    assert wait_until(lambda: state(scaling, low) is JobState.RUNNING, timeout=60)
    high = probe(scaling, priority="high", seconds=120)
    # The group has room for one more node: the high job gets it, the low job keeps running.
    assert wait_until(lambda: state(scaling, high) is JobState.RUNNING, timeout=60), scaling.get(high)
    assert wait_until(lambda: joined(scaling, "gpu") == 2, timeout=20), scaling.capacity().groups
    assert state(scaling, low) is JobState.RUNNING
    assert scaling.get(low).attempt == 1
    # Now at its maximum: one more high job can only run by stopping the low one.
    urgent = probe(scaling, priority="high", seconds=120)
    assert wait_until(lambda: scaling.get(low).attempt == 1 and state(scaling, low) in
                      (JobState.PREEMPTING, JobState.QUEUED), timeout=60), scaling.get(low)
    assert wait_until(lambda: state(scaling, urgent) is JobState.RUNNING, timeout=60), scaling.get(urgent)
    assert state(scaling, high) is JobState.RUNNING and joined(scaling, "gpu") == 2
    finish(scaling, low, high, urgent)


def _train_workers(queue: Queue) -> list:
    from ray.util.state import list_actors

    return list_actors(address=queue.settings.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                                       ("state", "=", "ALIVE")])


def _raylet(node_id: str) -> psutil.Process:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and f"--node_id={node_id}" in cmd:
            return proc
    raise AssertionError(f"no raylet for node {node_id}")


def test_mnist_spans_two_nodes_and_resumes_when_a_node_dies(scaling):
    """2 workers x 2 CPUs on 2-CPU nodes: the queue asks for the second node, Ray Train puts one
    worker on each. After the first checkpoint one node dies (its raylet and its workers SIGKILLed):
    the autoscaler replaces it, Ray Train restarts the group from the checkpoint across the two
    nodes, and the job reaches the accuracy of a single-node run (test_mnist_job.py)."""
    job = scaling.submit("mnist", {"num_workers": 2, "cpus_per_worker": 2, "epochs": 3, "train_samples": 3000,
                                   "test_samples": 500}).id
    assert wait_until(lambda: len({a.node_id for a in _train_workers(scaling)}) == 2, timeout=180, interval=1), \
        scaling.get(job)
    assert joined(scaling, "cpu") == 2
    snapshot = scaling.settings.data_dir / "checkpoints" / job / "checkpoint_manager_snapshot.json"
    assert wait_until(lambda: snapshot.exists() and '"checkpoint_results":[{' in snapshot.read_text(),
                      timeout=180, interval=0.2)
    victim = _train_workers(scaling)[0].node_id
    raylet = _raylet(victim)
    for proc in [*raylet.children(recursive=True), raylet]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived child may exit on its own first
            proc.kill()
    assert wait_until(lambda: state(scaling, job).is_terminal(), timeout=300, interval=2), scaling.get(job)
    record = scaling.get(job)
    logs = job_logs(scaling.settings, record.ray_submission_id)
    assert record.state is JobState.SUCCEEDED, logs[-3000:]
    starts = [int(n) for n in re.findall(r"start_epoch=(\d+)", logs)]
    assert starts[0] == 0 and max(starts) >= 1, starts  # restarted from a checkpoint, not from epoch 0
    assert float(re.findall(r"test_accuracy=([0-9.]+)", logs)[-1]) > 0.8
    # The driver's final logging (model, registry) ran on the head while the workers' nodes let go of
    # the job's working dir: each local node has a temp dir of its own, so nothing it deletes is the head's.
    assert '"tracking_lost": null' in logs, logs[-2000:]
    nodes = {n for n in scaling.capacity().resources.by_node}
    assert victim not in nodes and joined(scaling, "cpu") == 2  # replaced by a new node


def test_ray_data_stages_run_on_the_cpu_group_while_the_gpu_group_trains(scaling):
    """The LLM trainer with `--data-pipeline ray-data` on a GPU worker: Ray Data's tokenizer and the
    rank's block reader land on the CPU group's node (the label both renderings give it), while the
    Ray Train worker holds the GPU node's logical GPU."""
    job = scaling.submit("llm", {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, "model": "tiny",
                                 "dataset": "pydoc", "block_size": 32, "batch_size": 2, "max_steps": 4,
                                 "eval_every": 4, "eval_batches": 1, "max_train_tokens": 20_000,
                                 "data_pipeline": "ray-data"}).id
    assert wait_until(lambda: state(scaling, job).is_terminal(), timeout=300, interval=2), scaling.get(job)
    record = scaling.get(job)
    logs = job_logs(scaling.settings, record.ray_submission_id)
    assert record.state is JobState.SUCCEEDED, logs[-3000:]
    assert "tokenizer on node group cpu" in logs and "rank 0's tokens reader on node group cpu" in logs, logs[-3000:]
    assert "on node group gpu" not in logs and "on node group head" not in logs
    assert re.search(r"step 4/4 .*tokens/s=", logs), logs[-2000:]


def test_oppen_train_goes_through_the_queue_and_its_cost_is_reported(scaling):
    """`oppen train` is a queued job like any other: priority high by default, the caller's tenant,
    GPUs from the autoscaler, and metered into `oppen cost report`."""
    import subprocess
    import sys

    env = {**os.environ, "OPPEN_CONFIG_DIR": str(scaling.settings.cluster_file.parent)}
    cli = [sys.executable, "-m", "ray_apps.cli", "--config", str(scaling.settings.source)]
    done = subprocess.run([*cli, "train", "probe", "--gpus-per-worker", "1", "--seconds", "2", "--tenant", "team-x"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"queued (probe-\S+) \(high, tenant team-x\)", done.stdout).group(1)
    assert f"job {job_id}: QUEUED" in done.stdout and "done in" in done.stdout
    job = scaling.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.tenant == "team-x" and job.priority == "high"
    assert wait_until(lambda: "team-x" in subprocess.run([*cli, "cost", "report", "--by", "tenant"],
                                                         capture_output=True, text=True, env=env).stdout, timeout=30)
    report = subprocess.run([*cli, "cost", "report", "--by", "tenant"], capture_output=True, text=True, env=env)
    row = next(line for line in report.stdout.splitlines() if line.startswith("team-x"))
    assert row.split()[1] == "1" and float(row.split()[3]) > 0, report.stdout  # one job, GPU-hours > 0
    # The nodes the groups ran (the CPU group's node has run all along) against what jobs used.
    cpu_group = re.search(r"group cpu +ran ([0-9.]+) node-h", report.stdout)
    assert cpu_group and float(cpu_group.group(1)) > 0, report.stdout
    assert "utilisation (jobs' hours over the nodes'):" in report.stdout


def test_a_plain_ray_job_submit_of_a_trainer_is_adopted_metered_and_cancellable(scaling):
    """Submitted around the queue with Ray's own client: the dispatcher finds it in Ray's job list,
    records it under Ray's submission id with the tenant from its metadata, and meters it."""
    from ray.job_submission import JobSubmissionClient

    from ray_apps.config import PROJECT_ROOT
    from ray_apps.scheduler.adoption import ADOPTED_PRIORITY
    from ray_apps.training import WORKING_DIR_EXCLUDES

    ray_jobs = JobSubmissionClient(scaling.settings.dashboard_url)
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES}
    done = ray_jobs.submit_job(entrypoint="python -m trainers.probe --gpus-per-worker 1 --seconds 2",
                               metadata={"tenant": "team-y"}, runtime_env=runtime_env)
    assert wait_until(lambda: done in scaling.store.known_ids([done]), timeout=30), "not adopted"
    job = scaling.get(done)
    assert (job.tenant, job.priority, job.gpus_per_worker, job.trainer) == ("team-y", ADOPTED_PRIORITY, 1.0, "probe")
    assert wait_until(lambda: done in scaling.store.costs([done]), timeout=120), scaling.get(done)
    assert scaling.get(done).state is JobState.SUCCEEDED
    cost = scaling.store.costs([done])[done]
    assert cost.gpu_usd > 0 and cost.seconds > 1

    # A long one is cancelled through the queue like any job of its tenant.
    long = ray_jobs.submit_job(entrypoint="python -m trainers.probe --seconds 120", metadata={"tenant": "team-y"},
                               runtime_env=runtime_env)
    assert wait_until(lambda: long in scaling.store.known_ids([long]) and state(scaling, long) is JobState.RUNNING,
                      timeout=60), "not adopted as running"
    scaling.cancel(long, tenant="team-y")
    assert wait_until(lambda: ray_jobs.get_job_status(long).value == "STOPPED", timeout=30)
