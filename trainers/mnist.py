"""MNIST CNN on Ray Train, as a plain Ray job.

    ray job submit --working-dir . -- python -m trainers.mnist --epochs 2

Four units, as in Ray's own examples: data (`trainers.data`), the model and step
code (`trainers.mnist_model`, no Ray), `train_func` run by every worker, and the
driver `main` that takes the scaling flags and owns the MLflow run.

Each epoch: train loss/accuracy, test accuracy, epoch time, samples/s and the
cumulative cost, a checkpoint, and one batched MLflow write from rank 0. A worker
that dies is replaced and the group restarts from the last checkpoint;
`--resume` continues a stopped run the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import secrets
import sys
import tempfile
import time
from pathlib import Path

from trainers import runtime
from trainers.data import DataError, default_data_dir
from trainers.pricing import Allocation, CatalogError, load_catalog
from trainers.specs import MnistConfig, SpecError, add_arguments, config_from_args
from trainers.tracking import TrackingUnavailable, check_server, open_run, tracking_uri

TRAINER = "mnist"
PROGRESS = "[oppen]"          # prefix of the lines `oppen train` shows as progress
RESULT = "OPPEN_RESULT"       # prefix of the final JSON line `oppen train` reads
CHECKPOINT_FILE = "state.pt"
log = logging.getLogger(TRAINER)


# --------------------------------------------------------------------------- worker


def train_func(cfg: dict) -> None:
    """Run by every Ray Train worker."""
    import ray.train
    import torch
    import torch.distributed as dist

    from trainers.data import load_mnist
    from trainers.mnist_model import MnistCNN, evaluate, make_optimizer, to_tensors, train_epoch
    from trainers.tracking import RunTracker

    spec = MnistConfig(**cfg["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # use exactly what Ray reserved
    torch.manual_seed(spec.seed)
    device = ray.train.torch.get_device()

    data = load_mnist(cfg["data_dir"])
    x, y = to_tensors(data.train_images[:spec.train_samples], data.train_labels[:spec.train_samples])
    tx, ty = to_tensors(data.test_images[:spec.test_samples], data.test_labels[:spec.test_samples])
    tx, ty = tx[rank::world], ty[rank::world]  # each rank scores its share of the test set

    model = ray.train.torch.prepare_model(MnistCNN(spec.width))  # device + DDP when world > 1
    per_rank_batch = spec.batch_size // world
    steps_per_epoch = -(-(len(x) // world) // per_rank_batch)
    start_epoch, base_elapsed, state = 0, 0.0, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        start_epoch = state["epoch"]
        # Same segment (a worker restart): time since segment start already covers it.
        base_elapsed = state["base_elapsed_s"] if state["segment_id"] == cfg["segment_id"] else state["elapsed_s"]
    optimizer, scheduler = make_optimizer(model, lr=spec.lr, total_steps=spec.epochs * steps_per_epoch,
                                          done_steps=start_epoch * steps_per_epoch)
    if state:
        optimizer.load_state_dict(state["optimizer"])

    catalog = load_catalog(cfg["costs_file"])
    alloc = Allocation.for_workers(spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker)
    tracker = RunTracker(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 and cfg["run_id"] else None
    if tracker:
        tracker.log_params({"data_source": data.source, "device": str(device),
                            "train_size": len(x), "test_size": len(data.test_images[:spec.test_samples])})
        if start_epoch:
            tracker.set_tags({"oppen.resumed_from_epoch": start_epoch})
    if rank == 0:
        print(f"{PROGRESS} data={data.source} device={device} train={len(x)} test={len(tx) * world} "
              f"workers={world} start_epoch={start_epoch}", flush=True)

    for epoch in range(start_epoch, spec.epochs):
        stats = train_epoch(model, optimizer, scheduler, x, y, batch_size=per_rank_batch, epoch=epoch,
                            seed=spec.seed, rank=rank, world=world, device=device)
        correct, count, test_loss = evaluate(model, tx, ty, device=device)
        sums = torch.tensor([stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples,
                             correct, count, test_loss], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)  # the whole gang's numbers, not rank 0's share
        train_loss, train_correct, samples, correct, count, test_loss = sums.tolist()
        elapsed = base_elapsed + (time.time() - cfg["segment_start"])
        cost = catalog.cost(alloc, elapsed)
        metrics = {
            "epoch": epoch + 1, "train_loss": train_loss / samples, "train_accuracy": train_correct / samples,
            "test_loss": test_loss / count, "test_accuracy": correct / count, "epoch_time_s": stats.seconds,
            "samples_per_s": samples / stats.seconds, "elapsed_s": elapsed, **cost.as_metrics(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:  # one copy of the state is enough; DDP keeps ranks identical
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "elapsed_s": elapsed, "base_elapsed_s": base_elapsed,
                            "segment_id": cfg["segment_id"], "width": spec.width}, Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            if tracker:
                tracker.log_metrics(metrics, step=epoch + 1)
                tracker.flush()
                metrics["tracking_unsent"] = tracker.unsent
                metrics["tracking_s"] = tracker.seconds
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            print(f"{PROGRESS} epoch {epoch + 1}/{spec.epochs} train_loss={metrics['train_loss']:.4f} "
                  f"test_accuracy={metrics['test_accuracy']:.4f} epoch_time={stats.seconds:.1f}s "
                  f"samples/s={metrics['samples_per_s']:.0f} cost=${cost.total_usd:.5f}", flush=True)


def _unwrap(model):
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.mnist", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, MnistConfig)
    run = parser.add_argument_group("run")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="datasets and checkpoints (default: $OPPEN_DATA_DIR or ./.oppen)")
    run.add_argument("--run-name", default=None, help="name of this run (default: generated)")
    run.add_argument("--resume", action="store_true",
                     help="continue --run-name (or the latest mnist run) from its last checkpoint")
    run.add_argument("--experiment", default="mnist", help="MLflow experiment")
    run.add_argument("--mlflow-run-id", default=None, help="log into this existing MLflow run")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(args)
    except (SpecError, DataError, CatalogError, TrackingUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    spec = config_from_args(MnistConfig, args)
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
        run_name = run_name or runtime.latest_run_name(data_dir, TRAINER)
        run_dir = runtime.checkpoint_root(data_dir) / (run_name or "")
        if not run_name or not (run_dir / runtime.RUN_RECORD).exists():
            raise SpecError(f"nothing to resume: no mnist run {run_name or ''} under "
                            f"{runtime.checkpoint_root(data_dir)}. To fix: drop --resume or name a run "
                            "with --run-name.")
        record = runtime.read_run_record(run_dir)
        overrides = {k: v for k, v in _given_spec_flags(args.argv).items() if record["spec"].get(k) != v}
        spec = MnistConfig(**{**record["spec"], **overrides})  # saved config, changes given now on top
    run_name = run_name or runtime.new_run_name(TRAINER)
    run_dir = runtime.checkpoint_root(data_dir) / run_name

    run_id = None
    if not args.no_tracking:
        meta = runtime.job_metadata()
        tags = {"oppen.trainer": TRAINER, "oppen.run_name": run_name,
                **{f"oppen.{k}": v for k, v in meta.items() if k in ("tenant", "priority")}}
        if "job_submission_id" in meta:
            tags["ray.submission_id"] = meta["job_submission_id"]
        run_id = open_run(uri, experiment=args.experiment, run_name=run_name,
                          run_id=args.mlflow_run_id or record.get("mlflow_run_id"), tags=tags)
    runtime.write_run_record(run_dir, {"trainer": TRAINER, "spec": dataclasses.asdict(spec),
                                       "mlflow_run_id": run_id, "tracking_uri": uri})
    if run_id:
        from trainers.tracking import RunTracker

        first = RunTracker(uri, run_id)
        if args.resume:  # MLflow params are immutable: a resumed run records what changed as a tag
            first.set_tags({"oppen.resume_overrides": json.dumps(overrides)})
        else:
            first.log_params(dataclasses.asdict(spec))
        first.flush()
    print(f"{PROGRESS} run {run_name} mlflow_run_id={run_id} resume={args.resume}", flush=True)
    return _fit(spec, run_name=run_name, data_dir=data_dir, costs_file=costs_file, uri=uri, run_id=run_id)


def _given_spec_flags(argv: list[str] | None) -> dict:
    """Only the config flags typed on the command line, not their defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, MnistConfig, with_defaults=False)
    return vars(parser.parse_known_args(argv)[0])


def _fit(spec: MnistConfig, *, run_name: str, data_dir: Path, costs_file: str, uri: str,
         run_id: str | None) -> int:
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = spec.gpus_per_worker > 0 and _cuda_on_gpu_nodes(spec.gpus_per_worker)
    if spec.gpus_per_worker > 0 and not use_gpu:
        print(f"{PROGRESS} GPUs reserved but no CUDA on the GPU nodes: computing on CPU", flush=True)
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        resources["GPU"] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"spec": dataclasses.asdict(spec), "data_dir": str(data_dir), "costs_file": costs_file,
                           "tracking_uri": uri, "run_id": run_id, "segment_start": time.time(),
                           "segment_id": secrets.token_hex(4)},
        # Logical GPUs (a CPU-only box) are reserved as resources; use_gpu only with real CUDA.
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(runtime.checkpoint_root(data_dir)),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - report the failure in MLflow, then exit non-zero
        _close_run(uri, run_id, status="FAILED")
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    metrics = dict(result.metrics or {})
    t0 = time.perf_counter()
    lost = _finish_run(uri, run_id, spec, result.checkpoint, metrics)
    summary = {"run_name": run_name, "mlflow_run_id": run_id, "tracking_uri": uri,
               "test_accuracy": metrics.get("test_accuracy"), "cost_usd": metrics.get("cost_usd"),
               "epochs": metrics.get("epoch"), "tracking_lost": lost,
               # Time spent on MLflow: per-epoch batches on rank 0 + the final model upload.
               "tracking_s": metrics.get("tracking_s", 0.0) + (time.perf_counter() - t0 if run_id else 0.0)}
    print(f"{RESULT} {json.dumps(summary)}", flush=True)
    return 0


def _cuda_on_gpu_nodes(gpus: float) -> bool:
    """Ask a GPU slot whether it has CUDA: logical GPUs on a CPU box do not."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=0)
    def has_cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    return bool(ray.get(has_cuda.remote()))


def _finish_run(uri: str, run_id: str | None, spec: MnistConfig, checkpoint, metrics: dict) -> str | None:
    """Log the model and close the run. Returns a note if tracking was (partly) lost."""
    notes = []
    if metrics.get("tracking_unsent"):
        notes.append(f"{int(metrics['tracking_unsent'])} metric/param value(s) from training were not logged")
    if run_id is None:
        return None
    try:
        import mlflow
        import numpy as np
        import torch

        from trainers.mnist_model import MnistCNN

        model = MnistCNN(spec.width)
        with checkpoint.as_directory() as ckpt_dir:
            model.load_state_dict(torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, weights_only=True)["model"])
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            # Pickle format with this package shipped as code: ~0.02 s, where pt2's first
            # torch.export costs ~3.5 s of a 100 s run. Loads anywhere with mlflow.
            example = np.zeros((2, 1, 28, 28), dtype=np.float32)
            # Stating the requirement skips MLflow's import-capturing inference (~8 s here).
            requirement = f"torch=={torch.__version__.split('+')[0]}"
            mlflow.pytorch.log_model(model.eval(), name="model", input_example=example,
                                     pip_requirements=[requirement], serialization_format="pickle",
                                     code_paths=[str(Path(__file__).resolve().parent)])
            # Re-sent in case tracking dropped out mid-run; same step, so no duplicate point.
            mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "cost_usd") if k in metrics},
                               step=int(metrics.get("epoch", 0)))
    except Exception as exc:  # noqa: BLE001 - the training result stands without tracking
        notes.append(f"final logging failed ({type(exc).__name__}: {str(exc)[:200]})")
    if notes:
        note = f"MLflow tracking lost for run {run_id} at {uri}: " + "; ".join(notes)
        print(f"WARNING: {note}", file=sys.stderr, flush=True)
        return note
    return None


def _close_run(uri: str, run_id: str | None, *, status: str) -> None:
    if run_id is None:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001 - the server may be the thing that failed
        log.warning("could not mark MLflow run %s as %s", run_id, status)


if __name__ == "__main__":
    sys.exit(main())
