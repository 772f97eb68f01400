"""POST /v1/agent on the router path, on Ray Serve and on plain uvicorn, in one run.

    .venv/bin/python benchmarks/agent.py          # ~5 minutes on 2 cores

The same FastAPI app (`ray_apps.agent.http`) answers "show me the queue" (the
intent router, one tool call on the SQLite queue store, one checkpoint in a new
thread) under: plain uvicorn (the baseline, measured before and after), and Ray
Serve in four set-ups (`serve_proxy` in configs/platform.yaml): Serve's Python proxy
with Serve's defaults, the same with Serve's throughput bundle, and Ray's HAProxy in
front of direct-ingress replicas without and with the bundle (the platform's
default). Bounded load: 1 client x 300 requests, then 8 clients x 100; p50/p99
latency and requests/s, always through the platform's public port.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from benchmarks import httpload  # noqa: E402
from ray_apps import cluster  # noqa: E402
from ray_apps.agent import http  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402

BENCH = {"ray": {"gcs_port": 6979, "dashboard_port": 8865, "metrics_export_port": 8680, "dashboard_agent_port": 52965},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5600}, "serve_port": 8600,
         "metrics_port": 9486, "prometheus": {"enabled": False}}
PROXY_PORTS = {"stats_port": 8684, "metrics_port": 9191, "fallback_port": 8691}
PLAIN_PORT = 8690
MESSAGE = {"message": "show me the queue"}
CONFIGS = {  # serve_proxy settings
    "serve_defaults": {"kind": "python", "throughput_optimized": False},
    # Serve's bundle for throughput (user code on the replica's event loop, handle calls over
    # gRPC, buffered request logs, no stderr logging, GC frozen at start), same Python proxy.
    "serve_throughput_optimized": {"kind": "python", "throughput_optimized": True},
    # Ray's HAProxy routes straight to each ingress replica's own HTTP server.
    "serve_haproxy": {"kind": "haproxy", "throughput_optimized": False},
    "serve_haproxy_throughput": {"kind": "haproxy", "throughput_optimized": True},  # the platform's default
}

# The baseline: the same app, mounted at the same path, under uvicorn.
plain_app = FastAPI()
plain_app.mount("/v1/agent", http.app)


def load(url: str, clients: int, per_client: int) -> dict:
    return httpload.load(url, clients, per_client, MESSAGE)


def trivial_p50_ms(url: str, n: int = 200) -> float:
    """p50 of GET /health on the same app: what the HTTP path costs with no work behind it."""
    session, times = requests.Session(), []
    for _ in range(n):
        t0 = time.perf_counter()
        session.get(url, timeout=30).raise_for_status()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(url: str) -> dict:
    load(url, 1, 20)  # warm-up
    return {"health_p50_ms": trivial_p50_ms(url.rstrip("/") + "/health"),
            "1_client": load(url, 1, 300), "8_clients": load(url, 8, 100)}


def write_settings(tmp: Path, serve_proxy: dict) -> Path:
    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH,
                                   "serve_proxy": {**PROXY_PORTS, **serve_proxy}}))
    return cfg


def plain(cfg: Path) -> dict:
    env = {**os.environ, "OPPEN_CONFIG": str(cfg), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.agent:plain_app", "--host", "127.0.0.1",
                             "--port", str(PLAIN_PORT), "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{PLAIN_PORT}/v1/agent/"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.5)
        return measure(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def on_serve(tmp: Path, serve_proxy: dict) -> dict:
    cfg = write_settings(tmp, serve_proxy)
    os.environ["OPPEN_CONFIG"] = str(cfg)
    settings = load_settings(cfg)
    cluster.up(settings, timeout=180, say=lambda s: None)
    try:
        return measure(cluster.serve_url(settings) + "/v1/agent")
    finally:
        cluster.down(settings, say=lambda s: None)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="oppen-agent-bench-"))
    (tmp / "data").mkdir()
    out: dict = {"message": MESSAGE["message"]}
    try:
        cfg = write_settings(tmp, {})
        out["plain_before"] = plain(cfg)
        print("plain uvicorn:", json.dumps(out["plain_before"]), flush=True)
        for name, proxy in CONFIGS.items():
            try:
                out[name] = on_serve(tmp, proxy)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not work is a result too
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name}:", json.dumps(out[name]), flush=True)
        out["plain_after"] = plain(cfg)
        print("plain uvicorn again:", json.dumps(out["plain_after"]), flush=True)
        base = {k: statistics.mean([out["plain_before"][k]["rps"], out["plain_after"][k]["rps"]])
                for k in ("1_client", "8_clients")}
        out["throughput_ratio"] = {name: {k: out[name][k]["rps"] / base[k] for k in base}
                                   for name in CONFIGS if "error" not in out[name]}
        print("Serve / plain requests/s:", json.dumps(out["throughput_ratio"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "agent.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
