"""A probe job: reserves a gang of workers (CPUs/GPUs) for --seconds, then ends.

    python -m trainers.probe --num-workers 2 --gpus-per-worker 1 --seconds 10

It behaves like a trainer where the scheduler can see it: it holds its whole
request at once (a placement group, like Ray Train's worker group), reports
progress every second, keeps a checkpoint of how far it got (also told to the
platform, as trainers do), drains on request (`trainers.drain`: exit 75 after its
checkpoint), and `--resume` continues from there. Used by the scheduler's tests and benchmarks, where MNIST's
~30 s of Ray Train start-up would swamp what is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainers import drain, runtime
from trainers.data import default_data_dir
from trainers.specs import ProbeConfig, SpecError, add_arguments, config_from_args

PROGRESS, RESULT = "[oppen]", "OPPEN_RESULT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.probe", description=__doc__.split("\n\n")[0])
    add_arguments(parser, ProbeConfig)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--mlflow-run-id", default=None, help="accepted for symmetry; the probe logs nothing")
    args = parser.parse_args(argv)
    try:
        spec = config_from_args(ProbeConfig, args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_name = args.run_name or runtime.new_run_name("probe")
    state_file = runtime.checkpoint_root((args.data_dir or default_data_dir())) / run_name / "probe.json"
    done = json.loads(state_file.read_text())["done_s"] if args.resume and state_file.exists() else 0.0

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(log_to_driver=False)
    bundle = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    pg = placement_group([bundle] * spec.num_workers, strategy="PACK")
    ray.get(pg.ready())  # the whole gang, or nothing
    print(f"{PROGRESS} probe {run_name} holds {spec.num_workers} x {bundle} start_s={done:.0f}", flush=True)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    watch = drain.DrainWatch(runtime.job_metadata().get("job_submission_id"), poll_s=0.5)
    start = time.monotonic() - done
    step = 0
    while (elapsed := time.monotonic() - start) < spec.seconds:
        time.sleep(min(1.0, spec.seconds - elapsed))
        step += 1
        done_s = min(time.monotonic() - start, spec.seconds)
        state_file.write_text(json.dumps({"done_s": done_s}))
        stop = watch.should_stop(step) and done_s < spec.seconds
        watch.checkpointed(time.time(), 0, int(done_s), drained=stop)
        if stop:
            remove_placement_group(pg)
            print(f"{PROGRESS} drained at {done_s:.0f}/{spec.seconds:g} s: resumes from this checkpoint", flush=True)
            return drain.DRAINED_EXIT
        print(f"{PROGRESS} probe {run_name} {done_s:.0f}/{spec.seconds:g} s", flush=True)
    remove_placement_group(pg)
    sys.stdout.write(f"{RESULT} {json.dumps({'run_name': run_name, 'resumed_from_s': done})}\n")  # one write
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
