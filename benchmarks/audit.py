"""The audit log, measured against its anchors in one run (no Ray, no REST: the queue's own cost).

    .venv/bin/python benchmarks/audit.py          # ~1 minute on 2 cores

(a) `Queue.submit` with auditing on and off, side by side: two queues on two SQLite files of the
    same kind in the same directory, submits interleaved (on, off, on, off...) so both see the same
    machine; p50/p95 of each and what auditing adds at p50 (goal: <= 1 ms).
(b) `AuditLog.verify` over 100,000 records (bulk-inserted, chained as `record` chains them;
    goal: <= 5 s).
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

from ray_apps.audit import GENESIS, Actor, AuditLog, audit_log, canonical, record_hash  # noqa: E402
from ray_apps.config import Settings  # noqa: E402
from ray_apps.scheduler.api import Queue  # noqa: E402
from ray_apps.scheduler.config import QueueConfig  # noqa: E402
from ray_apps.scheduler.store import JobStore, make_engine  # noqa: E402

NODES = [{"CPU": 64.0, "GPU": 8.0}]  # the cluster submits are checked against (no Ray asked)


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1]


def submit_bench(tmp: Path, n: int) -> dict:
    Queue.max_nodes = lambda self: NODES  # feasibility against a fixed cluster, not a live Ray
    queues = {}
    for name in ("on", "off"):
        settings = Settings(data_dir=tmp / name)
        settings.data_dir.mkdir(parents=True)
        queue = Queue(settings, QueueConfig(), JobStore(f"sqlite:///{settings.data_dir / 'queue.db'}"))
        if name == "off":
            queue.audit = None
        queues[name] = queue
    actor = Actor("bench", "team-a", "rest", "127.0.0.1")
    times = {"on": [], "off": []}
    for i in range(n + 20):
        for name in ("on", "off") if i % 2 else ("off", "on"):  # alternate who goes first
            t0 = time.perf_counter()
            queues[name].submit("mnist", {"epochs": 1}, tenant="team-a", actor=actor)
            if i >= 20:  # the first submits warm caches and the SQLite files
                times[name].append((time.perf_counter() - t0) * 1000)
    out = {name: {"p50_ms": statistics.median(t), "p95_ms": pct(t, 95), "n": len(t)} for name, t in times.items()}
    out["added_p50_ms"] = out["on"]["p50_ms"] - out["off"]["p50_ms"]
    out["audit_records"] = len(queues["on"].audit.export())
    return out


def bulk_chain(log: AuditLog, n: int, batch: int = 10_000) -> None:
    """`n` records chained exactly as `record` chains them, inserted in large transactions."""
    prev, t0 = GENESIS, time.time()
    actor = Actor("bench", "team-a", "rest", "127.0.0.1")
    for start in range(0, n, batch):
        rows = []
        for seq in range(start + 1, min(start + batch, n) + 1):
            row = {"seq": seq, "at": t0 + seq / 1000, "user": actor.user, "tenant": actor.tenant,
                   "front_end": actor.front_end, "source": actor.source, "action": "job.submit",
                   "target": f"mnist-{seq:08d}", "params": canonical({"trainer": "mnist", "params": {"epochs": 1}}),
                   "outcome": "ok", "reason": "", "prev_hash": prev}
            row["hash"] = prev = record_hash(row)
            rows.append(row)
        with log.engine.begin() as conn:
            conn.execute(audit_log.insert(), rows)


def verify_bench(tmp: Path, n: int) -> dict:
    log = AuditLog(make_engine(f"sqlite:///{tmp / 'verify.db'}"))
    t0 = time.perf_counter()
    bulk_chain(log, n)
    insert_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = log.verify()
        runs.append(time.perf_counter() - t0)
    assert result.ok and result.records == n, result
    return {"records": n, "verify_s": min(runs), "verify_runs_s": runs, "bulk_insert_s": insert_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=500, help="timed submits per side (default: 500)")
    parser.add_argument("--records", type=int, default=100_000, help="records to verify (default: 100,000)")
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory(prefix="oppen-audit-") as tmp:
        print(f"(a) Queue.submit, auditing on vs off, {args.submits} interleaved submits each", flush=True)
        out["submit"] = submit_bench(Path(tmp), args.submits)
        print(f"(b) verify over {args.records:,} records", flush=True)
        out["verify"] = verify_bench(Path(tmp), args.records)
    s, v = out["submit"], out["verify"]
    print(f"\n{'':24}{'p50 ms':>10}{'p95 ms':>10}")
    for name in ("off", "on"):
        print(f"  submit, audit {name:4}{'':6}{s[name]['p50_ms']:10.3f}{s[name]['p95_ms']:10.3f}")
    print(f"  audit adds at p50: {s['added_p50_ms']:+.3f} ms (goal <= 1 ms)")
    print(f"  verify {v['records']:,} records: {v['verify_s']:.2f} s (goal <= 5 s); "
          f"bulk insert took {v['bulk_insert_s']:.2f} s")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "audit.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
