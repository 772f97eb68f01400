"""The scheduler, measured against its anchors in one run.

    .venv/bin/python benchmarks/scheduler.py          # ~3 minutes on 2 cores

(a) The policy alone (`policy.plan`) on simulated queues of 1k..20k jobs over
    1,000 GPUs (125 nodes x 8): decisions (queued jobs considered) per second,
    and how the time grows with the queue.
(b) On a local cluster (2 logical GPUs): a chain of probe jobs that each need
    both GPUs goes through the queue; latency from one job's end (Ray's end_time)
    to the next one RUNNING (Ray's start_time), p50/p95, against the same probe
    submitted straight to `JobSubmissionClient.submit_job`, submit to RUNNING.
"""

from __future__ import annotations

import json
import random
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
from ray_apps.scheduler.api import Queue  # noqa: E402
from ray_apps.scheduler.config import QueueConfig  # noqa: E402
from ray_apps.scheduler.policy import Gang, PolicyConfig, PriorityClass, QueuedJob, Quota, RunningJob, plan  # noqa: E402
from ray_apps.training import entrypoint_for, submit_entrypoint  # noqa: E402

BENCH = {"ray": {"gcs_port": 6679, "dashboard_port": 8565, "metrics_export_port": 8380, "client_server_port": 9701,
                 "dashboard_agent_port": 52665},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5300}, "serve_port": 8300,
         "metrics_port": 9483, "serve_proxy": {"stats_port": 8374, "metrics_port": 9173, "fallback_port": 8375},
         "prometheus": {"enabled": False}}


def policy_bench() -> dict:
    cfg = PolicyConfig(classes={"low": PriorityClass("low", 0), "normal": PriorityClass("normal", 1),
                                "high": PriorityClass("high", 2, preempt_after_s=600)},
                       quotas={f"t{i}": Quota(cpus=400, gpus=60) for i in range(20)}, aging_s=1800)
    nodes = [{"CPU": 64.0, "GPU": 8.0} for _ in range(125)]
    rng = random.Random(0)
    out = {}
    for n in (1_000, 2_000, 5_000, 10_000, 20_000):
        queued = [QueuedJob(f"q{i}", f"t{rng.randrange(20)}", rng.choice(["low", "normal", "high"]),
                            submitted_at=i, gang=Gang(rng.choice([1, 1, 2, 4]), 4, rng.choice([0, 1, 1, 2])))
                  for i in range(n)]
        running = [RunningJob(f"r{i}", f"t{i % 20}", "low", started_at=i, gang=Gang(1, 4, 1)) for i in range(500)]
        free = [dict(node, GPU=node["GPU"] - 4) for node in nodes]  # half the GPUs busy
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            p = plan(queued, running, free, cfg, now=n + 3600)
            best = min(best, time.perf_counter() - t0)
        out[n] = {"seconds": best, "decisions_per_s": n / best, "admitted": len(p.admit),
                  "preempted": len(p.preempt)}
        print(f"  {n:6} queued: {best * 1000:7.1f} ms per plan, {n / best:10,.0f} decisions/s, "
              f"{len(p.admit)} admitted, {len(p.preempt)} preempted", flush=True)
    return out


def start_platform(tmp: Path):
    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH}))
    (tmp / "queue.yaml").write_text(yaml.safe_dump({"poll_s": 0.2}))
    import os

    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(cfg), str(tmp)
    settings = load_settings(cfg)
    cluster.up(settings, timeout=120, say=lambda s: None)
    cluster.use_ray_token()
    return settings


def cluster_bench(settings, chain: int = 8) -> dict:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(settings.dashboard_url)
    params = {"seconds": 1.0, "num_workers": 1, "gpus_per_worker": 2}

    raw = []
    for i in range(chain):
        sid = f"raw-{int(time.time())}-{i}"
        t0 = time.time()
        submit_entrypoint(settings, sid, entrypoint_for("probe", params), {})
        while client.get_job_status(sid).value not in ("SUCCEEDED", "FAILED"):
            time.sleep(0.1)
        info = client.get_job_info(sid)
        raw.append(info.start_time / 1000 - t0)  # start_time: Ray's own RUNNING time

    queue = Queue.from_settings(settings, QueueConfig(poll_s=0.2))
    ids = [queue.submit("probe", params).id for _ in range(chain)]
    while not all(queue.get(i).state.is_terminal() for i in ids):
        time.sleep(0.5)
    infos = [client.get_job_info(queue.get(i).ray_submission_id) for i in ids]
    infos.sort(key=lambda j: j.start_time)
    gaps = [(b.start_time - a.end_time) / 1000 for a, b in zip(infos, infos[1:])]
    assert all(queue.get(i).state.value == "SUCCEEDED" for i in ids)

    def pct(xs, q):
        return statistics.quantiles(xs, n=20)[q // 5 - 1] if len(xs) > 1 else xs[0]

    return {"raw_submit_to_running_s": {"p50": statistics.median(raw), "p95": pct(raw, 95), "all": raw},
            "queue_free_to_running_s": {"p50": statistics.median(gaps), "p95": pct(gaps, 95), "all": gaps},
            "queue_overhead_p50_s": statistics.median(gaps) - statistics.median(raw)}


def main() -> None:
    out = {"policy": None, "cluster": None}
    print("(a) policy.plan on simulated queues, 1,000 GPUs", flush=True)
    out["policy"] = policy_bench()
    print("(b) local cluster, probe jobs needing both GPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="oppen-sched-") as tmp:
        settings = start_platform(Path(tmp))
        try:
            out["cluster"] = cluster_bench(settings)
        finally:
            cluster.down(settings, say=lambda s: None)
    c = out["cluster"]
    print(json.dumps(c, indent=1))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "scheduler.json").write_text(json.dumps(out, indent=2))
    p10k = out["policy"][10_000]
    print(f"\nsummary\n  policy at 10,000 queued: {p10k['decisions_per_s']:,.0f} decisions/s (>= 10,000)")
    print(f"  free -> next RUNNING via the queue: p50 {c['queue_free_to_running_s']['p50']:.2f} s, "
          f"p95 {c['queue_free_to_running_s']['p95']:.2f} s; raw submit -> RUNNING: p50 "
          f"{c['raw_submit_to_running_s']['p50']:.2f} s; queue adds {c['queue_overhead_p50_s']:+.2f} s p50 (<= 0.5)")


if __name__ == "__main__":
    main()
