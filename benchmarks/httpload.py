"""Bounded HTTP load for the benchmarks: N clients x M requests, p50/p99 latency and requests/s."""

from __future__ import annotations

import math
import statistics
import threading
import time

import requests


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def load(url: str, clients: int, per_client: int, body: dict, headers: dict | None = None) -> dict:
    """`clients` threads each POST `body` `per_client` times, one request at a time."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors = []

    def client():
        session, mine = requests.Session(), []
        for _ in range(per_client):
            t0 = time.perf_counter()
            resp = session.post(url, json=body, headers=headers, timeout=60)
            mine.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors.append(resp.status_code)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "rps": len(latencies) / wall}
