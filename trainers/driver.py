"""What every trainer's driver (the Ray job's entrypoint) does, written once.

A trainer module supplies its config class and a `fit(spec, ctx)`; this module
parses the flags (config fields from the catalog + the run flags below), checks
the data dir, the price catalog, the MLflow server and the dataset (trainers/ingest.py:
every row of a dataset of one's own) before anything starts,
handles `--resume` (saved config, flags given now on top), opens the MLflow run,
and builds the torch trainer with checkpointing and failure handling.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from trainers import ingest, runtime
from trainers.data import DataError, default_data_dir
from trainers.dataset_catalog import DatasetError
from trainers.drain import DRAINED_EXIT, drained_position
from trainers.pricing import CatalogError, load_catalog
from trainers.sources import SourceError
from trainers.specs import SpecError, add_arguments, config_from_args, servable
from trainers.tracking import TrackingUnavailable, check_server, open_run, tracking_client, tracking_uri

PROGRESS = "[oppen]"          # prefix of the lines `oppen train` shows as progress
RESULT = "OPPEN_RESULT"       # prefix of the final JSON line `oppen train` reads
log = logging.getLogger("trainers")


@dataclass(frozen=True)
class RunContext:
    trainer: str
    run_name: str
    data_dir: Path
    costs_file: str
    uri: str
    run_id: str | None
    resume: bool
    submission_id: str | None = None  # the Ray job's, when run as one: its drain requests reach the workers
    dataset: dict | None = None       # trainers.ingest.prepare's: the checked dataset, for the workers
    opening: threading.Thread | None = None  # the run's reopening, sent while the workers start

    def run_opened(self) -> None:
        """Wait for the run's reopening to be sent: it must land before the run is closed."""
        if self.opening is not None and self.opening.ident is not None:
            self.opening.join()


def build_parser(trainer: str, spec_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m trainers.{trainer}", description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, spec_cls)
    run = parser.add_argument_group("run")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="datasets and checkpoints (default: $OPPEN_DATA_DIR or ./.oppen)")
    run.add_argument("--run-name", default=None, help="name of this run (default: generated)")
    run.add_argument("--resume", action="store_true",
                     help=f"continue --run-name (or the latest {trainer} run) from its last checkpoint")
    run.add_argument("--experiment", default=trainer, help="MLflow experiment")
    run.add_argument("--mlflow-run-id", default=None, help="log into this existing MLflow run")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser


def main(trainer: str, spec_cls: type, fit: Callable[[Any, RunContext], int], description: str,
         argv: list[str] | None = None) -> int:
    """Parse, prepare and fit. Bad input is exit 2 with the reason; a failed fit is exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(trainer, spec_cls, description).parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    try:
        spec, ctx = prepare(args, given, trainer, spec_cls)
        return fit(spec, ctx)
    except (SpecError, DataError, DatasetError, CatalogError, TrackingUnavailable, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def prepare(args: argparse.Namespace, argv: list[str], trainer: str, spec_cls: type) -> tuple[Any, RunContext]:
    spec = config_from_args(spec_cls, args)
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist. To fix: run `oppen up` (it creates it) "
                        "or pass an existing directory with --data-dir / OPPEN_DATA_DIR.")
    costs_file = str(load_catalog().source)  # fail now, not inside a worker
    uri = tracking_uri()
    if not args.no_tracking:
        check_server(uri)

    run_name, record, overrides = args.run_name, {}, {}
    if args.resume:
        run_name = run_name or runtime.latest_run_name(data_dir, trainer)
        run_dir = runtime.checkpoint_root(data_dir) / (run_name or "")
        if not run_name or not (run_dir / runtime.RUN_RECORD).exists():
            raise SpecError(f"nothing to resume: no {trainer} run {run_name or ''} under "
                            f"{runtime.checkpoint_root(data_dir)}. To fix: drop --resume or name a run "
                            "with --run-name.")
        record = runtime.read_run_record(run_dir)
        overrides = {k: v for k, v in given_spec_flags(argv, spec_cls).items() if record["spec"].get(k) != v}
        spec = spec_cls(**{**record["spec"], **overrides})  # saved config, changes given now on top
    # The dataset: looked up, hashed and (one's own) every row checked, before any worker or MLflow run.
    dataset = ingest.prepare(spec, data_dir)
    if dataset:
        print(f"{PROGRESS} {ingest.describe(dataset)}", flush=True)
    run_name = run_name or runtime.new_run_name(trainer)
    run_dir = runtime.checkpoint_root(data_dir) / run_name

    run_id, opening = None, None
    meta = runtime.job_metadata()
    if not args.no_tracking:
        tags = {"oppen.trainer": trainer, "oppen.run_name": run_name,
                **{f"oppen.{k}": v for k, v in meta.items() if k in ("tenant", "priority")}}
        if "job_submission_id" in meta:
            tags["ray.submission_id"] = meta["job_submission_id"]

        def open_and_describe(known: str | None) -> str:
            opened = open_run(uri, experiment=args.experiment, run_name=run_name, run_id=known, tags=tags)
            from trainers.tracking import RunTracker

            first = RunTracker(uri, opened)
            if args.resume:  # MLflow params are immutable: a resumed run records what changed as a tag
                first.set_tags({"oppen.resume_overrides": json.dumps(overrides)})
            else:
                first.log_params(dataclasses.asdict(spec))
            first.flush()
            return opened

        run_id = args.mlflow_run_id or record.get("mlflow_run_id")
        if run_id:  # the queue made the run: these requests overlap the workers' start
            opening = threading.Thread(target=_in_background, args=(open_and_describe, run_id),
                                       name="mlflow-run", daemon=True)
        else:
            run_id = open_and_describe(None)
    runtime.write_run_record(run_dir, {"trainer": trainer, "spec": dataclasses.asdict(spec),
                                       "mlflow_run_id": run_id, "tracking_uri": uri})
    print(f"{PROGRESS} run {run_name} mlflow_run_id={run_id} resume={args.resume}", flush=True)
    return spec, RunContext(trainer, run_name, data_dir, costs_file, uri, run_id, args.resume,
                            meta.get("job_submission_id"), dataset, opening)


def _in_background(call: Callable, *args) -> None:
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001 - tracking never stops training; the end reports what was lost
        log.warning("could not reopen the MLflow run: %s", exc)
        print(f"WARNING: could not reopen the MLflow run ({type(exc).__name__}: {str(exc)[:200]})",
              file=sys.stderr, flush=True)


_mlflow_import: threading.Thread | None = None


def import_mlflow_in_background() -> None:
    """Import MLflow's client in a thread, once: the finish logs the model with it, and the import
    takes this process 1-2 s on 2 cores. Called once the workers are up, so that the import runs
    beside their set-up (torch and the first step) rather than competing with their start."""
    global _mlflow_import
    if _mlflow_import is None:
        _mlflow_import = threading.Thread(target=importlib.import_module, args=("mlflow",), name="mlflow-import",
                                          daemon=True)
        _mlflow_import.start()


def given_spec_flags(argv: list[str] | None, spec_cls: type) -> dict:
    """Only the config flags typed on the command line, not their defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, spec_cls, with_defaults=False)
    return vars(parser.parse_known_args(argv)[0])


def torch_trainer(train_func: Callable[[dict], None], loop_config: dict, spec, ctx: RunContext, *,
                  callbacks: list | None = None, storage_path: Path | None = None,
                  datasets: dict | None = None, dataset_config=None, in_trial: bool = False):
    """A torch trainer for the spec's gang (trainers.torch_backend: no torch in this process or Ray
    Train's controller), checkpointing under the data dir, restarting failed workers; `datasets` /
    `dataset_config`: Ray Data inputs the workers read with `ray.train.get_dataset_shard`;
    `in_trial`: built in a Tune trial's process rather than the job's driver."""
    import ray.train

    from trainers.torch_backend import TorchTrainer

    use_gpu = spec.gpus_per_worker > 0 and cuda_on_gpu_nodes(spec.gpus_per_worker)
    if spec.gpus_per_worker > 0 and not use_gpu:
        print(f"{PROGRESS} GPUs reserved but no CUDA on the GPU nodes: computing on CPU", flush=True)
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        resources["GPU"] = spec.gpus_per_worker
    config = train_loop_config(loop_config, spec, ctx)
    data = {"datasets": datasets, **({"dataset_config": dataset_config} if dataset_config else {})} if datasets else {}
    scaling = ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=use_gpu,
                                      resources_per_worker=resources if use_gpu else {"CPU": spec.cpus_per_worker})
    # Logical GPUs (a CPU-only box) are reserved as resources, so the workers land on the GPU group's
    # nodes, but computed on with CPU (use_gpu only with real CUDA). Ray refuses that pair when the
    # config is built, so the GPUs join the reservation after.
    scaling.resources_per_worker = resources
    return TorchTrainer(
        train_func, use_gpu=use_gpu, driver_owns_run=not in_trial, train_loop_config=config, **data,
        on_workers_started=import_mlflow_in_background if ctx.run_id and not in_trial else None,
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=ctx.run_name, storage_path=str(storage_path or runtime.checkpoint_root(ctx.data_dir)),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks,
        ),
    )


def train_loop_config(loop_config: dict, spec, ctx: RunContext) -> dict:
    """What `train_func` is called with: the trainer's own `loop_config` and what every run needs."""
    import secrets

    return {"spec": dataclasses.asdict(spec), "data_dir": str(ctx.data_dir), "costs_file": ctx.costs_file,
            "tracking_uri": ctx.uri, "run_id": ctx.run_id, "segment_start": time.time(),
            "segment_id": secrets.token_hex(4), **loop_config}


def base_elapsed(state: dict | None, cfg: dict) -> float:
    """Training time before this segment: a worker restart in the same segment is already
    covered by the time since the segment started; a resumed run carries its total."""
    if not state:
        return 0.0
    return state["base_elapsed_s"] if state["segment_id"] == cfg["segment_id"] else state["elapsed_s"]


def cuda_on_gpu_nodes(gpus: float) -> bool:
    """Ask a GPU slot whether it has CUDA: logical GPUs on a CPU box do not."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=0)
    def has_cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    return bool(ray.get(has_cuda.remote()))


def close_run(uri: str, run_id: str | None, *, status: str) -> None:
    if run_id is None:
        return
    try:
        tracking_client(uri).set_status(run_id, status)
    except Exception:  # noqa: BLE001 - the server may be the thing that failed
        log.warning("could not mark MLflow run %s as %s", run_id, status)


def fit_and_report(trainer, ctx: RunContext, finish: Callable[[Any], dict]) -> int:
    """Run `trainer.fit()`; on success `finish(result)` logs the model and returns the summary printed
    as the RESULT line; on failure the MLflow run is marked FAILED and the exit code is 1. A run that
    drained (trainers.drain) logs no model, prints no RESULT line, leaves its MLflow run open for the
    attempt that resumes it, and exits with DRAINED_EXIT."""
    if ctx.opening is not None:  # started once this process has imported Ray Train: see RunTracker
        ctx.opening.start()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - report the failure in MLflow, then exit non-zero
        ctx.run_opened()
        close_run(ctx.uri, ctx.run_id, status="FAILED")
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ctx.run_opened()
    drained = drained_position(getattr(result, "metrics", None))
    if drained:
        print(f"{PROGRESS} drained at epoch {drained[0] + 1} step {drained[1]}: resumes from this checkpoint",
              flush=True)
        return DRAINED_EXIT
    summary = {"run_name": ctx.run_name, "mlflow_run_id": ctx.run_id, "tracking_uri": ctx.uri, **finish(result)}
    print_result(summary)
    return 0


def exit_now(code: int) -> None:
    """End the driver's process now that its work is done and its output written. Python's own
    teardown (Ray's disconnect at exit, unloading torch) otherwise adds ~2 s to every job's end, and
    `ray.shutdown()` alone 0.3 s: the raylet sees the driver's connection close as the process ends
    and ends the job's workers then, as it does for a driver that is killed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def result_of(lines: Iterable[str]) -> dict[str, Any]:
    """The summary `fit` printed as its RESULT line (the last one, wherever Ray's prefix puts it); {}
    when there is none or it does not parse."""
    for line in reversed(list(lines)):
        at = line.find(RESULT)
        if at >= 0:
            # The JSON alone: a line Ray forwards from a worker may land right after it, unbroken.
            text = line[at + len(RESULT):].lstrip()
            try:
                found, _ = json.JSONDecoder().raw_decode(text)
            except ValueError:
                continue
            return found if isinstance(found, dict) else {}
    return {}


def print_result(summary: dict) -> None:
    """The RESULT line, in one write: print() writes the text and its newline apart, and a line
    Ray forwards from a worker in between lands on the same line."""
    sys.stdout.write(f"{RESULT} {json.dumps(summary)}\n")
    sys.stdout.flush()


def _register(ctx: RunContext) -> str | None:
    """A finished run of a servable trainer becomes a version of its registered model."""
    from trainers.registry import register_run

    if ctx.trainer not in servable():
        return None
    mv = register_run(ctx.uri, ctx.run_id)
    print(f"{PROGRESS} registered model {mv.name} version {mv.version}", flush=True)
    return mv.version


def finish(ctx: RunContext, result, log_model: Callable[[dict], None], summary: dict[str, str]) -> dict:
    """After a successful fit: `log_model(metrics)` to the run (a failure is noted, never fatal) and
    the RESULT fields, `summary` mapping result names to the final metrics' keys."""
    metrics = dict(result.metrics or {})
    t0 = time.perf_counter()
    notes = []
    if metrics.get("tracking_unsent"):
        notes.append(f"{int(metrics['tracking_unsent'])} metric/param value(s) from training were not logged")
    version = None
    if ctx.run_id:
        try:
            log_model(metrics)
            logged = time.perf_counter()
            version = _register(ctx)
            print(f"{PROGRESS} finishing: model logged in {logged - t0:.1f} s, registered in "
                  f"{time.perf_counter() - logged:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - the training result stands without tracking
            notes.append(f"final logging failed ({type(exc).__name__}: {str(exc)[:200]})")
    lost = None
    if notes:
        lost = f"MLflow tracking lost for run {ctx.run_id} at {ctx.uri}: " + "; ".join(notes)
        print(f"WARNING: {lost}", file=sys.stderr, flush=True)
    return {**{name: metrics.get(key) for name, key in summary.items()}, "tracking_lost": lost,
            "model_version": version,
            # Time spent on MLflow: the batches rank 0 sent while training + the final model upload.
            "tracking_s": metrics.get("tracking_s", 0.0) + (time.perf_counter() - t0 if ctx.run_id else 0.0)}
