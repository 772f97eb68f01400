"""MNIST serving on Ray Serve, with and without @serve.batch, against the model in process.

    .venv/bin/python benchmarks/serving.py        # ~6 minutes on 2 cores

Starts its own platform (own ports and data dir), trains one small MNIST model through the
queue-less Jobs API path (it registers itself), then measures POST /v1/models/mnist/predict with
one image per request: 1 client x 300 requests and 8 clients x 100, each with batching on
(max_batch_size 64, 5 ms wait) and off (the MnistModel's user_config, switched in place). The
limit is the same model called in this process with one thread, one image per call and 8 images
per call (what a batch of 8 callers could at best share). Predictions/s, p50/p99 latency.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

from benchmarks import httpload  # noqa: E402
from ray_apps import cluster  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402
from ray_apps.training import follow, submit_training  # noqa: E402
from trainers.data import load_mnist  # noqa: E402

BENCH = {"ray": {"gcs_port": 7079, "dashboard_port": 8965, "metrics_export_port": 8780, "dashboard_agent_port": 53065},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5700}, "serve_port": 8700,
         "metrics_port": 9487, "serve_proxy": {"stats_port": 8774, "metrics_port": 9177, "fallback_port": 8775},
         "prometheus": {"enabled": False}}
TRAIN = {"epochs": 1, "train_samples": 6000, "test_samples": 1000, "cpus_per_worker": 2}


def wait_served(models_url: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = requests.get(models_url, timeout=30).json()
        replica = next(m for m in listing if m["name"] == "mnist")["replica"]
        if replica and replica["version"] == version:
            return
        time.sleep(1)
    raise RuntimeError(f"mnist version {version} not served after {timeout} s")


def set_batching(settings, on: bool) -> None:
    """Redeploy the Serve config with MnistModel's user_config changed: Serve reconfigures in place."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = cluster.serve_config(settings)
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            if dep["name"] == "MnistModel":
                dep["user_config"] = {**dep.get("user_config", {}), "batching": on}
    ServeSubmissionClient(settings.dashboard_url).deploy_applications(config)
    time.sleep(3)
    deadline = time.monotonic() + 120
    while not cluster.serve_healthy(settings) and time.monotonic() < deadline:
        time.sleep(1)


def in_process(uri: str, version: str, images: np.ndarray) -> dict:
    import torch

    from ray_apps.serve.served_models import forward, load_mnist_version
    from trainers.registry import get_version

    torch.set_num_threads(1)  # as one replica
    model = load_mnist_version(uri, get_version(uri, "mnist", version))  # the replicas' own loader
    out = {}
    for per_call in (1, 8):
        forward(model, images[:per_call])  # warm-up
        times = []
        for i in range(0, 800, per_call):
            t0 = time.perf_counter()
            forward(model, images[i % 900:i % 900 + per_call])
            times.append(time.perf_counter() - t0)
        out[f"{per_call}_per_call"] = {"predictions_per_s": 800 / sum(times),
                                       "p50_ms": 1000 * statistics.median(times)}
    return out


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="oppen-serving-bench-"))
    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH}))
    os.environ["OPPEN_CONFIG"] = str(cfg)
    os.environ.pop("OPPEN_TENANT_TOKENS", None)
    settings = load_settings(cfg)
    out: dict = {"train": TRAIN}
    try:
        t0 = time.monotonic()
        cluster.up(settings, timeout=180, say=lambda s: None)
        cluster.use_ray_token()
        out["up_s"] = time.monotonic() - t0
        sub = submit_training(settings, "mnist", TRAIN)
        outcome = follow(settings, sub.submission_id, on_progress=lambda line: None, timeout_s=900)
        if not outcome.ok:
            raise RuntimeError("\n".join(outcome.log_tail))
        version = outcome.result["model_version"]
        out["model"] = {"version": version, "test_accuracy": outcome.result["test_accuracy"]}
        models_url = cluster.serve_url(settings) + "/v1/models"
        wait_served(models_url, version)
        images = load_mnist(settings.data_dir).test_images
        body = {"images": images[:1].tolist()}
        url = models_url + "/mnist/predict"
        for batching in (True, False):
            set_batching(settings, batching)
            wait_served(models_url, version)
            httpload.load(url, 1, 20, body)  # warm-up
            key = "serve_batched" if batching else "serve_unbatched"
            out[key] = {"1_client": httpload.load(url, 1, 300, body), "8_clients": httpload.load(url, 8, 100, body)}
            print(f"{key}:", json.dumps(out[key]), flush=True)
        out["in_process"] = in_process(settings.tracking_uri, version, images)
        print("in process:", json.dumps(out["in_process"]), flush=True)
        limit = out["in_process"]["1_per_call"]["predictions_per_s"]
        out["fraction_of_in_process"] = {k: {c: out[k][c]["rps"] / limit for c in ("1_client", "8_clients")}
                                         for k in ("serve_batched", "serve_unbatched")}
        out["batching_gain_8_clients"] = out["serve_batched"]["8_clients"]["rps"] / \
            out["serve_unbatched"]["8_clients"]["rps"]
        print("Serve / in-process predictions/s:", json.dumps(out["fraction_of_in_process"]), flush=True)
        print(f"batching gain at 8 clients: {out['batching_gain_8_clients']:.2f}x", flush=True)
    finally:
        cluster.down(settings, say=lambda s: None)
        shutil.rmtree(tmp, ignore_errors=True)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "serving.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
