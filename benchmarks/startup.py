"""Seconds, not minutes: the platform's start, its memory at rest, and where a job's time goes.

    .venv/bin/python benchmarks/startup.py                 # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/startup.py --readme        # + the README's 2-epoch MNIST run
    .venv/bin/python benchmarks/startup.py --idle-minutes 30
    .venv/bin/python benchmarks/startup.py --default-topology   # worker groups + Prometheus, as `oppen up`

1. `oppen up` from cold on benchmark ports: seconds to healthy; RSS of everything it started
   after 1 minute at rest, per service (and after --idle-minutes, to see growth at rest).
2. Small MNIST jobs (1 epoch, 512 images) through the queue on the idle platform, one after
   another: submit -> first optimizer step (queued + starting + first step, trainers.phases) and
   each phase, p50 over --jobs runs.
3. With --readme: the README's job (2 epochs of MNIST) through the queue: submit-to-done over its
   training phase (target <= 1.25x).
4. With --tune: a 4-trial MNIST search through the queue, trials one at a time (--tune-concurrent):
   submit-to-done over the sum of its trials' training phases, from each child run's phase tags
   (target <= 1.5x).

Single-head mode by default (configs/cluster.single-head.yaml, no Prometheus: the topology of the tests);
--default-topology measures `oppen up`'s own: its first job waits for the node Ray's autoscaler adds.
Results go to stdout and to benchmarks/results/startup.json (startup-default.json).
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

from benchmarks.train_mnist import start_platform  # noqa: E402
from ray_apps import cluster  # noqa: E402
from ray_apps.processes import ServiceRegistry  # noqa: E402
from ray_apps.scheduler.api import Queue  # noqa: E402
from trainers.phases import PHASES  # noqa: E402

SMALL = {"epochs": 1, "train_samples": 512, "test_samples": 256}
README_JOB = {"epochs": 2}
TUNE_TRIAL = {"epochs": 2, "train_samples": 12_000, "test_samples": 2_000, "cpus_per_worker": 2}


def rss_by_service(settings, measure: str = "rss") -> dict[str, float]:
    """GB held by each service `oppen up` started (its whole process tree): `rss`, shared pages once per
    process, or `pss`, each shared page counted once (what the machine spends)."""
    return {name: round(getattr(s, f"{measure}_bytes")() / 2**30, 3)
            for name, s in ServiceRegistry(settings.state_dir).running().items()}


def run_job(queue: Queue, params: dict, timeout: float = 900) -> dict:
    """Submit through the queue, wait for the end and the settled phases; submit-to-done seconds too."""
    t0 = time.time()
    job = queue.submit("mnist", params, tenant="bench")
    deadline = time.monotonic() + timeout
    while True:
        rec = queue.get(job.id)
        phases = queue.store.phases([job.id]).get(job.id)
        if rec.state.is_terminal() and phases is not None:
            break
        if time.monotonic() > deadline:
            sys.exit(f"{job.id} not settled after {timeout} s: {rec.state} {rec.message}")
        time.sleep(0.5)
    if rec.state.value != "SUCCEEDED" or phases.training is None:
        sys.exit(f"{job.id} ended {rec.state.value} ({rec.message}); phases {phases}")
    got = {name: round(getattr(phases, name), 2) for name in PHASES}
    attempt = queue.store.attempts([job.id])[job.id][-1]
    return {**got, "first_step_after_s": round(phases.queued + phases.starting + phases.first_step, 2),
            "submit_to_done_s": round(attempt.ended_at - t0, 2)}


def run_search(queue: Queue, concurrent: int, timeout: float = 1800) -> dict:
    """A 4-trial search through the queue: submit-to-done and the trials' training phases."""
    from mlflow.tracking import MlflowClient

    from trainers.phases import TAG_FIRST_STEP, TAG_LOOP, TAG_TRAINED

    t0 = time.time()
    job = queue.submit("mnist", TUNE_TRIAL, tenant="bench",
                       search={"num_samples": 4, "max_concurrent": concurrent, "search_seed": 1})
    deadline = time.monotonic() + timeout
    while not (rec := queue.get(job.id)).state.is_terminal():
        if time.monotonic() > deadline:
            sys.exit(f"search {job.id} not done after {timeout} s: {rec.state} {rec.message}")
        time.sleep(0.5)
    wall = time.time() - t0
    if rec.state.value != "SUCCEEDED":
        sys.exit(f"search {job.id} ended {rec.state.value} ({rec.message})")
    client = MlflowClient(queue.settings.tracking_uri)
    parent = client.get_run(rec.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    marks = sorted(tuple(float(c.data.tags[tag]) for tag in (TAG_LOOP, TAG_FIRST_STEP, TAG_TRAINED))
                   for c in children if all(tag in c.data.tags for tag in (TAG_LOOP, TAG_FIRST_STEP, TAG_TRAINED)))
    if len(marks) != 4:
        sys.exit(f"search {job.id}: {len(marks)} of {len(children)} trials have their phase tags")
    training = [trained - first for _, first, trained in marks]
    # Where the rest went, one trial at a time: before the first trial's loop, between a trial's last
    # report and the next one's first step, and after the last trial's last report.
    gaps = {"to_first_trial_loop_s": round(marks[0][0] - t0, 1),
            "between_trials_s": [round(b[1] - a[2], 1) for a, b in zip(marks, marks[1:])],
            "after_last_trial_s": round(t0 + wall - marks[-1][2], 1)}
    return {"submit_to_done_s": round(wall, 1), "trial_training_s": [round(t, 1) for t in training],
            "ratio_to_training": round(wall / sum(training), 3), "max_concurrent": concurrent,
            **(gaps if concurrent == 1 else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="small jobs for the time to first step")
    parser.add_argument("--readme", action="store_true", help="also the README's 2-epoch MNIST run")
    parser.add_argument("--idle-minutes", type=float, default=1.0, help="how long to watch RSS at rest")
    parser.add_argument("--tune", action="store_true", help="also a 4-trial search's wall over its trials' training")
    parser.add_argument("--tune-concurrent", type=int, default=1, help="trials at once in that search")
    parser.add_argument("--default-topology", action="store_true",
                        help="`oppen up`'s default: configs/cluster.yaml's worker groups (Ray's autoscaler adds the "
                             "first job's node) and Prometheus, instead of single-head mode")
    args = parser.parse_args()
    out: dict = {"topology": "default" if args.default_topology else "single-head"}
    with tempfile.TemporaryDirectory(prefix="oppen-startup-") as tmp:
        settings, up_s, _ = (start_platform(Path(tmp), "configs/cluster.yaml", prometheus_port=9590)
                             if args.default_topology else start_platform(Path(tmp)))
        try:
            out["up_s"] = round(up_s, 1)
            print(f"oppen up: healthy in {up_s:.1f} s", flush=True)
            time.sleep(max(0.0, 60 - 5))
            out["rss_1min_gb"] = rss_by_service(settings)
            out["pss_1min_gb"] = rss_by_service(settings, "pss")
            print(f"RSS after 1 min at rest: {sum(out['rss_1min_gb'].values()):.2f} GB {out['rss_1min_gb']}; "
                  f"PSS {sum(out['pss_1min_gb'].values()):.2f} GB {out['pss_1min_gb']}", flush=True)
            if args.idle_minutes > 1:
                time.sleep((args.idle_minutes - 1) * 60)
                key = f"rss_{args.idle_minutes:g}min_gb"
                out[key] = rss_by_service(settings)
                growth = sum(out[key].values()) / sum(out["rss_1min_gb"].values()) - 1
                out["rss_growth_at_rest"] = round(growth, 4)
                print(f"RSS after {args.idle_minutes:g} min: {sum(out[key].values()):.2f} GB ({growth:+.1%})",
                      flush=True)

            queue = Queue.from_settings(settings)
            small = []
            for i in range(args.jobs):
                got = run_job(queue, SMALL)
                small.append(got)
                print(f"small job {i + 1}: first step {got['first_step_after_s']} s after submit; "
                      + ", ".join(f"{p} {got[p]} s" for p in PHASES), flush=True)
            if small:
                out["small_jobs"] = small
                out["first_step_p50_s"] = statistics.median(j["first_step_after_s"] for j in small)
                out["phases_p50_s"] = {p: statistics.median(j[p] for j in small) for p in PHASES}
                print(f"submit -> first step p50: {out['first_step_p50_s']} s (target <= 10 s); phases p50 "
                      f"{out['phases_p50_s']}", flush=True)

            if args.readme:
                got = run_job(queue, README_JOB)
                ratio = got["submit_to_done_s"] / got["training"]
                out["readme_job"] = {**got, "ratio_to_training": round(ratio, 3)}
                print(f"README job: {got['submit_to_done_s']} s submit-to-done for {got['training']} s of "
                      f"training: {ratio:.2f}x (target <= 1.25x)", flush=True)
            if args.tune:
                got = run_search(queue, args.tune_concurrent)
                out["tune_search"] = got
                print(f"4-trial search ({args.tune_concurrent} at a time): {got['submit_to_done_s']} s submit-to-done "
                      f"for {sum(got['trial_training_s']):.1f} s of trial training {got['trial_training_s']}: "
                      f"{got['ratio_to_training']:.2f}x (target <= 1.5x); before the first trial "
                      f"{got.get('to_first_trial_loop_s')} s, between trials {got.get('between_trials_s')} s, "
                      f"after the last {got.get('after_last_trial_s')} s", flush=True)
        finally:
            cluster.down(settings)
    path = ROOT / "benchmarks" / "results" / ("startup-default.json" if args.default_topology else "startup.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
