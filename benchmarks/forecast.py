"""The cost forecast, measured against the metered truth in one run.

    .venv/bin/python benchmarks/forecast.py          # ~5 minutes on 2 cores

Several real MNIST jobs of different lengths go through the queue of a local
platform, one after another. For each, once it is metered, the forecast engine
is replayed as of the moment 25% and 50% of its epochs were reported (the same
function the service calls, with only the data it had then), and its final-cost
point is compared with the metered cost: mean absolute % error, and how often
the 90% interval held the truth. Pre-start forecasts (from the runs before) are
scored the same way. While the last job runs, POST /v1/forecast on Ray Serve is
timed for the running job and for a trainer config, and again on the idle
cluster afterwards, each beside /v1/health on the same Serve proxy: p50/p95.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402

from ray_apps import cluster  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402
from ray_apps.costs.forecast import forecast_running, tail_of, timer_ratio_of  # noqa: E402
from ray_apps.costs.runs import past_runs, progress_points  # noqa: E402
from ray_apps.costs.service import CostService  # noqa: E402
from ray_apps.scheduler.api import Queue  # noqa: E402

BENCH = {"ray": {"gcs_port": 6779, "dashboard_port": 8665, "metrics_export_port": 8480, "dashboard_agent_port": 52765},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5400}, "serve_port": 8400,
         "metrics_port": 9484, "serve_proxy": {"stats_port": 8474, "metrics_port": 9174, "fallback_port": 8475},
         "prometheus": {"enabled": False}}
# (epochs, training images): lengths from ~25 s to ~75 s of training on 2 cores.
RUNS = [(4, 6000), (8, 3000), (6, 9000), (12, 2000), (8, 6000)]
LATENCY_REQUESTS = 200


def start_platform(tmp: Path):
    data = tmp / "data" / "datasets"
    data.mkdir(parents=True)
    cache = ROOT / ".oppen" / "test-cache" / "datasets"
    if (cache / "mnist.npz").exists():
        for name in ("mnist.npz", "mnist.json"):
            shutil.copy(cache / name, data / name)
    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH}))
    (tmp / "queue.yaml").write_text(yaml.safe_dump({"poll_s": 0.2}))
    import os

    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(cfg), str(tmp)
    settings = load_settings(cfg)
    from trainers.data import load_mnist

    load_mnist(tmp / "data")  # fetched once, or the copied cache
    cluster.up(settings, timeout=180, say=lambda s: None)
    cluster.use_ray_token()
    return settings


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def time_requests(url, body=None, n=LATENCY_REQUESTS):
    """Sequential requests: POST `body`, or GET when there is none."""
    session, out = requests.Session(), []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = session.post(url, json=body, timeout=30) if body is not None else session.get(url, timeout=30)
        out.append(time.perf_counter() - t0)
        resp.raise_for_status()
    return {"p50_ms": 1000 * statistics.median(out), "p95_ms": 1000 * pct(out, 0.95), "n": n}


def latency_set(api: str, body_job: dict | None, body_config: dict) -> dict:
    """/v1/forecast for a running job and for a config, against /v1/health on the same proxy (the
    baseline: Serve's own HTTP path with no work behind it), timed side by side."""
    out = {"health_baseline": time_requests(api.replace("/forecast", "/health"))}
    if body_job:
        out["running_job"] = time_requests(api, body_job)
    out["trainer_config"] = time_requests(api, body_config)
    return out


def replay(costs: CostService, job, fraction: float, history) -> dict:
    """The forecast as of the moment `fraction` of the epochs were reported."""
    mlflow = costs.mlflow
    a = costs.queue.store.attempts([job.id])[job.id][0]
    pts = progress_points(mlflow, job.mlflow_run_id)
    units = len(pts)
    k = max(1, math.floor(fraction * units))
    seen = pts[:k]
    timer = {m.step: m.value for m in mlflow.get_metric_history(job.mlflow_run_id, "epoch_time_s")}
    rate = costs.meter.cost_of(job).usd_per_hour
    fc = forecast_running(points=seen, units_total=units, now=seen[-1].at, spent_s=seen[-1].at - a.started_at,
                          usd_per_hour=rate, single_unit_s=timer.get(k) if k == 1 else None, tail=tail_of(history),
                          timer_ratio=timer_ratio_of(history))
    return {"progress": k / units, "total_usd": fc.total_usd, "low": fc.total_usd_low, "high": fc.total_usd_high}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="oppen-forecast-"))
    settings = start_platform(tmp)
    try:
        queue = Queue.from_settings(settings)
        costs = CostService.from_settings(settings, queue)
        api = cluster.serve_url(settings) + "/v1/forecast"
        rows, latency = [], {}
        for i, (epochs, samples) in enumerate(RUNS):
            params = {"epochs": epochs, "train_samples": samples, "test_samples": 1000}
            history = past_runs(costs.mlflow, "mnist")
            before = costs.forecast_new("mnist", params)
            job = queue.submit("mnist", params)
            print(f"run {i + 1}/{len(RUNS)}: {job.id} epochs={epochs} train_samples={samples}", flush=True)
            last = i == len(RUNS) - 1
            while not (job := queue.get(job.id)).state.is_terminal():
                if last and not latency and job.mlflow_run_id and len(progress_points(costs.mlflow,
                                                                                      job.mlflow_run_id)) >= 1:
                    latency["while_training"] = latency_set(api, {"job_id": job.id},
                                                            {"trainer": "mnist", "params": params})
                    print(f"  /v1/forecast latency while a job trains: {latency['while_training']}", flush=True)
                time.sleep(0.3)
            assert job.state.value == "SUCCEEDED", (job.state, job.message)
            while not (c := queue.store.costs([job.id]).get(job.id)) or not c.logged:
                time.sleep(0.3)
            final = costs.meter.cost_of(job).total_usd
            row = {"job": job.id, "epochs": epochs, "train_samples": samples, "final_usd": final,
                   "seconds": costs.meter.cost_of(job).seconds, "prestart": None}
            for frac in (0.25, 0.5):
                r = replay(costs, job, frac, history)
                r["error"] = abs(r["total_usd"] - final) / final
                r["covered"] = r["low"] <= final <= r["high"]
                row[f"at_{int(frac * 100)}"] = r
            if before.total_usd is not None:
                row["prestart"] = {"total_usd": before.total_usd, "error": abs(before.total_usd - final) / final,
                                   "covered": before.total_usd_low <= final <= before.total_usd_high}
            rows.append(row)
            print(f"  final ${final:.6f} in {row['seconds']:.1f} s; error at 25%: {row['at_25']['error']:.1%}, "
                  f"at 50%: {row['at_50']['error']:.1%}"
                  + (f", pre-start: {row['prestart']['error']:.1%}" if row["prestart"] else ", pre-start: no history"),
                  flush=True)
        latency["idle"] = latency_set(api, None, {"trainer": "mnist", "params": {"epochs": 4}})
        print(f"/v1/forecast latency, idle cluster: {latency['idle']}", flush=True)
        summary = {}
        for key in ("at_25", "at_50", "prestart"):
            scored = [r[key] for r in rows if r[key]]
            summary[key] = {"mape": statistics.fmean(s["error"] for s in scored),
                            "max_error": max(s["error"] for s in scored),
                            "interval_coverage": sum(s["covered"] for s in scored) / len(scored), "n": len(scored)}
        result = {"runs": rows, "summary": summary, "latency": latency}
        print(json.dumps({"summary": summary, "latency": latency}, indent=2))
        out = ROOT / "benchmarks" / "results"
        out.mkdir(exist_ok=True)
        (out / "forecast.json").write_text(json.dumps(result, indent=2))
    finally:
        cluster.down(settings)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
