"""The autoscaling cluster, measured against its anchors in one run.

    .venv/bin/python benchmarks/autoscaling.py          # ~8 minutes on 2 cores

On a local cluster started by `oppen up` from a topology (a CPU group of 2-CPU nodes, 1..2,
and a GPU group of 1-GPU nodes, 0..2, idle timeout 5 s), through the queue:

(a) Submit -> RUNNING of a 1-GPU probe when the GPU group is at 0 and a node must be added,
    against the same probe submitted while the node from the previous one is still there
    (capacity free). The added part, p50 and max over the rounds (target p50 <= 10 s).
(b) Idle node removal: from the probe's end to its node gone, against the idle timeout
    (target: within idle timeout + 10 s).
(c) MNIST, 2 workers x 2 CPUs on two 2-CPU nodes against 1 worker x 2 CPUs on one node:
    training throughput (samples/s over the epochs, from the trainer's own epoch times;
    target >= 0.85x; each worker gets 2 logical CPUs, and on this 2-core machine both nodes share
    the same 2 cores, so the ratio shows the cost of gloo across nodes, not a speed-up).
(d) Idle memory of what `oppen up` started, 60 s after it returned: the default topology
    (groups at their minimum) against single-head mode (configs/cluster.single-head.yaml).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ray_apps import cluster  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402
from ray_apps.processes import wait_until  # noqa: E402
from ray_apps.scheduler.api import Queue  # noqa: E402
from ray_apps.scheduler.config import QueueConfig  # noqa: E402
from ray_apps.scheduler.states import JobState  # noqa: E402

IDLE_TIMEOUT_S = 5
TOPOLOGY = {"head": {"cpus": 0}, "idle_timeout_s": IDLE_TIMEOUT_S,
            "worker_groups": [{"name": "cpu", "cpus": 2, "memory_gib": 1, "min_workers": 1, "max_workers": 2},
                              {"name": "gpu", "cpus": 1, "gpus": 1, "memory_gib": 1, "min_workers": 0,
                               "max_workers": 2}]}
BENCH = {"ray": {"gcs_port": 7079, "dashboard_port": 8965, "metrics_export_port": 8780, "dashboard_agent_port": 53165},
         "mlflow": {"port": 5800}, "serve_port": 8800, "metrics_port": 9488,
         "serve_proxy": {"stats_port": 8884, "metrics_port": 9291, "fallback_port": 8891},
         "prometheus": {"enabled": False}}
ROUNDS = 5


def start(tmp: Path, cluster_file: Path, *, serve: bool):
    cfg = tmp / "platform.yaml"
    data = tmp / "data"
    (data / "datasets").mkdir(parents=True, exist_ok=True)
    cache = ROOT / ".oppen" / "test-cache" / "datasets"
    for name in ("mnist.npz", "mnist.json"):
        if (cache / name).exists():
            shutil.copy(cache / name, data / "datasets" / name)
    cfg.write_text(yaml.safe_dump({"data_dir": str(data), "cluster_file": str(cluster_file), **BENCH}))
    (tmp / "queue.yaml").write_text(yaml.safe_dump({"poll_s": 0.2}))
    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(cfg), str(tmp)
    settings = load_settings(cfg)
    t0 = time.monotonic()
    cluster.up(settings, timeout=180, serve=serve, say=lambda s: None)
    cluster.use_ray_token()
    return settings, time.monotonic() - t0


def gpu_nodes(queue: Queue) -> int:
    return queue.capacity().groups["gpu"].joined


def to_running(queue: Queue) -> tuple[float, str]:
    t0 = time.monotonic()
    job = queue.submit("probe", {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, "seconds": 1}).id
    assert wait_until(lambda: queue.get(job).state is JobState.RUNNING, timeout=120, interval=0.05), queue.get(job)
    return time.monotonic() - t0, job


def scaling_rounds(queue: Queue) -> dict:
    cold, warm, removal = [], [], []
    for i in range(ROUNDS):
        assert wait_until(lambda: gpu_nodes(queue) == 0, timeout=120, interval=0.5)
        seconds, job = to_running(queue)
        cold.append(seconds)
        assert wait_until(lambda: queue.get(job).state is JobState.SUCCEEDED, timeout=60, interval=0.1)
        seconds, job = to_running(queue)   # the node is still there: capacity free
        warm.append(seconds)
        assert wait_until(lambda: queue.get(job).state is JobState.SUCCEEDED, timeout=60, interval=0.1)
        ended = time.monotonic()
        assert wait_until(lambda: gpu_nodes(queue) == 0, timeout=120, interval=0.2)
        removal.append(time.monotonic() - ended)
        print(f"  round {i + 1}: node added {cold[-1]:.2f} s, capacity free {warm[-1]:.2f} s, "
              f"node gone {removal[-1]:.1f} s after the job", flush=True)
    added = [c - w for c, w in zip(cold, warm)]
    return {"to_running_node_added_s": cold, "to_running_capacity_free_s": warm, "added_s": added,
            "added_p50_s": statistics.median(added), "added_max_s": max(added),
            "removal_after_end_s": removal, "removal_max_s": max(removal), "idle_timeout_s": IDLE_TIMEOUT_S}


def mnist_throughput(queue: Queue, workers: int) -> dict:
    params = {"num_workers": workers, "cpus_per_worker": 2, "epochs": 2, "train_samples": 12000,
              "test_samples": 1000}
    job = queue.submit("mnist", params).id
    assert wait_until(lambda: queue.get(job).state.is_terminal(), timeout=600, interval=1), queue.get(job)
    record = queue.get(job)
    logs = queue.logs(job)
    assert record.state is JobState.SUCCEEDED, logs[-2000:]
    times = [float(t) for t in re.findall(r"epoch_time=([0-9.]+)s", logs)]
    per_epoch = params["train_samples"] / statistics.median(times)
    acc = float(re.findall(r"test_accuracy=([0-9.]+)", logs)[-1])
    print(f"  {workers} worker(s) x 2 CPUs: {per_epoch:,.0f} samples/s (epoch times {times}), "
          f"test accuracy {acc:.4f}", flush=True)
    return {"samples_per_s": per_epoch, "epoch_times_s": times, "test_accuracy": acc}


def idle_memory(settings) -> float:
    time.sleep(60)
    return cluster.platform_rss_bytes(settings) / 2**30


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory(prefix="oppen-bench-scaling-") as tmp:
        tmp = Path(tmp)
        (tmp / "cluster.yaml").write_text(yaml.safe_dump(TOPOLOGY))
        settings, up_s = start(tmp / "scaling", tmp / "cluster.yaml", serve=False)
        try:
            queue = Queue.from_settings(settings, QueueConfig(poll_s=0.2))
            print("(a, b) scale-up and scale-down of the GPU group", flush=True)
            out["scaling"] = scaling_rounds(queue)
            print("(c) MNIST across nodes", flush=True)
            one = mnist_throughput(queue, 1)
            two = mnist_throughput(queue, 2)
            out["mnist"] = {"one_node": one, "two_nodes": two,
                            "ratio": two["samples_per_s"] / one["samples_per_s"]}
        finally:
            cluster.down(settings, say=lambda s: None)
        print("(d) idle memory, Serve apps included", flush=True)
        memory = {}
        for name, topology in (("default", ROOT / "configs" / "cluster.yaml"),
                               ("single_head", ROOT / "configs" / "cluster.single-head.yaml")):
            settings, up_s = start(tmp / name, topology, serve=True)
            try:
                memory[name] = {"gib": idle_memory(settings), "up_s": up_s}
            finally:
                cluster.down(settings, say=lambda s: None)
            print(f"  {name}: {memory[name]['gib']:.2f} GiB idle, up in {up_s:.1f} s", flush=True)
        out["idle_memory"] = {**memory, "ratio": memory["default"]["gib"] / memory["single_head"]["gib"]}
    s, m = out["scaling"], out["mnist"]
    print("\nsummary")
    print(f"  added part of submit->RUNNING: p50 {s['added_p50_s']:.2f} s, max {s['added_max_s']:.2f} s "
          f"(node added p50 {statistics.median(s['to_running_node_added_s']):.2f} s vs capacity free "
          f"p50 {statistics.median(s['to_running_capacity_free_s']):.2f} s)")
    print(f"  idle node gone at most {s['removal_max_s']:.1f} s after its job (idle timeout {IDLE_TIMEOUT_S} s)")
    print(f"  MNIST 2 nodes / 1 node throughput: {m['ratio']:.2f}x")
    print(f"  idle memory default / single head: {out['idle_memory']['ratio']:.2f}x")
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "autoscaling.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
