"""MNIST on the platform, measured against its anchors in one run.

    .venv/bin/python benchmarks/train_mnist.py            # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/train_mnist.py --quick    # smaller throughput runs

1. `oppen up` from cold on benchmark ports: seconds to healthy, idle RSS of
   everything it started.
2. Steady-state throughput: the same model and step code (`trainers.mnist_model`)
   in a plain single-process PyTorch loop (2 threads) vs Ray Train with 1 worker
   x 2 CPUs and 2 workers x 1 CPU. Ratio = Ray samples/s / plain samples/s,
   from the epochs after the first.
3. The full job on real MNIST (60k/10k, 2 epochs) through the platform:
   test accuracy and wall time from submit to done.
4. Tracking overhead: the same job with `--no-tracking`, and the time the
   tracked run itself spent talking to MLflow.

Results go to stdout and to benchmarks/results/train_mnist.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from ray_apps import cluster  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402
from ray_apps.training import PROJECT_ROOT, WORKING_DIR_EXCLUDES, follow, job_env_vars, submit_training  # noqa: E402
from trainers.data import load_mnist  # noqa: E402
from trainers.mnist_model import MnistCNN, make_optimizer, to_tensors, train_epoch  # noqa: E402
from trainers.specs import MnistConfig  # noqa: E402

BENCH_PORTS = {"gcs_port": 6579, "dashboard_port": 8465, "metrics_export_port": 8280,
               "dashboard_agent_port": 52565}


def start_platform(workdir: Path, cluster_file: str = "configs/cluster.single-head.yaml",
                   prometheus_port: int | None = None):
    """The platform on benchmark ports: single-head mode without Prometheus unless told otherwise."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    cfg = workdir / "platform.yaml"
    prometheus = {"enabled": True, "port": prometheus_port} if prometheus_port else {"enabled": False}
    cfg.write_text(yaml.safe_dump({"data_dir": str(data_dir), "ray": BENCH_PORTS, "cluster_file": cluster_file,
                                   "mlflow": {"port": 5200}, "serve_port": 8200,
                                   "metrics_port": 9482, "prometheus": prometheus,
                                   "serve_proxy": {"stats_port": 8274, "metrics_port": 9172, "fallback_port": 8275}}))
    settings = load_settings(cfg)
    load_mnist(ROOT / ".oppen" / "test-cache")  # fetch once per machine
    (data_dir / "datasets").mkdir()
    for name in ("mnist.npz", "mnist.json"):
        (data_dir / "datasets" / name).write_bytes((ROOT / ".oppen" / "test-cache" / "datasets" / name).read_bytes())
    t0 = time.monotonic()
    cluster.up(settings, timeout=120, say=lambda s: None)
    up_s = time.monotonic() - t0
    time.sleep(5)  # let start-up settle before reading memory
    idle_rss = cluster.platform_rss_bytes(settings)
    cluster.use_ray_token()
    return settings, up_s, idle_rss


def plain_loop(n: int, epochs: int, threads: int = 2) -> list[float]:
    """The anchor: one process, no Ray, same model/step code and batch size."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = MnistConfig()
    a = load_mnist(ROOT / ".oppen" / "test-cache")
    x, y = to_tensors(a.train_images[:n], a.train_labels[:n])
    model = MnistCNN(cfg.width)
    steps = -(-n // cfg.batch_size)
    opt, sched = make_optimizer(model, lr=cfg.lr, total_steps=epochs * steps)
    return [train_epoch(model, opt, sched, x, y, batch_size=cfg.batch_size, epoch=e, seed=0).samples_per_s
            for e in range(epochs)]


def platform_job(settings, params: dict) -> tuple[float, dict, list[float]]:
    """Submit through the platform; returns (submit-to-done seconds, result, samples/s per epoch)."""
    from mlflow.tracking import MlflowClient

    t0 = time.monotonic()
    sub = submit_training(settings, "mnist", params)
    outcome = follow(settings, sub.submission_id, on_progress=lambda line: print("   ", line, flush=True))
    wall = time.monotonic() - t0
    if not outcome.ok:
        sys.exit("job failed:\n" + "\n".join(outcome.log_tail))
    history = MlflowClient(settings.tracking_uri).get_metric_history(sub.mlflow_run_id, "samples_per_s")
    return wall, outcome.result, [m.value for m in sorted(history, key=lambda m: m.step)]


def untracked_job(settings, params: dict) -> float:
    """The same job as a plain `ray job submit ... --no-tracking`; returns submit-to-done seconds."""
    from ray.job_submission import JobSubmissionClient

    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in params.items())
    t0 = time.monotonic()
    job = JobSubmissionClient(settings.dashboard_url).submit_job(
        entrypoint=f"python -m trainers.mnist {flags} --no-tracking",
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES,
                     "env_vars": job_env_vars(settings)})
    outcome = follow(settings, job, on_progress=lambda line: print("   ", line, flush=True))
    if not outcome.ok:
        sys.exit("job failed:\n" + "\n".join(outcome.log_tail))
    return time.monotonic() - t0


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8k samples x 2 epochs for throughput")
    parser.add_argument("--throughput-only", action="store_true", help="skip the full 2-epoch runs")
    args = parser.parse_args()
    n, epochs = (8000, 2) if args.quick else (20000, 3)
    out: dict = {"machine": {"cpus": torch.get_num_threads()}}

    with tempfile.TemporaryDirectory(prefix="oppen-bench-") as tmp:
        settings, up_s, idle_rss = start_platform(Path(tmp))
        try:
            out["up_s"], out["idle_rss_gb"] = up_s, idle_rss / 2**30
            print(f"oppen up: healthy in {up_s:.1f} s; idle RSS {idle_rss / 2**30:.2f} GB", flush=True)

            print(f"throughput on {n} samples x {epochs} epochs", flush=True)
            plain = plain_loop(n, epochs)
            small = {"epochs": epochs, "train_samples": n, "test_samples": 1000}
            _, _, ray1 = platform_job(settings, {**small, "num_workers": 1, "cpus_per_worker": 2})
            _, _, ray2 = platform_job(settings, {**small, "num_workers": 2, "cpus_per_worker": 1})
            plain_again = plain_loop(n, epochs)  # bracket the Ray runs: drift shows up here
            anchor = statistics.mean([steady(plain), steady(plain_again)])
            out["throughput"] = {"plain_samples_s": anchor, "plain_runs": [plain, plain_again],
                                 "ray_1x2_samples_s": steady(ray1), "ray_2x1_samples_s": steady(ray2),
                                 "ratio_1x2": steady(ray1) / anchor, "ratio_2x1": steady(ray2) / anchor}
            print(json.dumps(out["throughput"], indent=1), flush=True)

            if args.throughput_only:
                return
            print("full MNIST, 2 epochs, through the platform", flush=True)
            wall, result, _ = platform_job(settings, {"epochs": 2})
            untracked = untracked_job(settings, {"epochs": 2})
            out["full_run"] = {"submit_to_done_s": wall, "test_accuracy": result["test_accuracy"],
                               "cost_usd": result["cost_usd"], "tracking_s": result["tracking_s"],
                               "tracking_share_of_wall": result["tracking_s"] / wall,
                               "untracked_submit_to_done_s": untracked,
                               "tracked_over_untracked": wall / untracked}
            print(json.dumps(out["full_run"], indent=1), flush=True)
            out["after_jobs_rss_gb"] = cluster.platform_rss_bytes(settings) / 2**30
        finally:
            cluster.down(settings, say=lambda s: None)

    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "train_mnist.json").write_text(json.dumps(out, indent=2))
    t, f = out["throughput"], out["full_run"]
    print("\nsummary")
    print(f"  oppen up healthy: {out['up_s']:.1f} s (target <= 30); idle RSS {out['idle_rss_gb']:.2f} GB (<= 2.5)")
    print(f"  Ray Train / plain loop: 1x2 CPU {t['ratio_1x2']:.2f}x, 2x1 CPU {t['ratio_2x1']:.2f}x (>= 0.9)")
    print(f"  full run: test accuracy {f['test_accuracy']:.4f} (>= 0.99), submit-to-done "
          f"{f['submit_to_done_s']:.0f} s (<= 120), cost ${f['cost_usd']:.5f}")
    print(f"  tracking: {f['tracking_s']:.2f} s in MLflow calls = {100 * f['tracking_share_of_wall']:.1f}% of wall; "
          f"tracked/untracked wall {f['tracked_over_untracked']:.3f} (<= 1.02)")


if __name__ == "__main__":
    main()
