"""MNIST CNN on Ray Train, as a plain Ray job.

    ray job submit --working-dir . -- python -m trainers.mnist --epochs 2

Four units, as in Ray's own examples: data (`trainers.data`), the model and step
code (`trainers.mnist_model`, no Ray), `train_func` run by every worker, and the
driver (`fit` on top of `trainers.driver`) that takes the flags and owns the MLflow run.

Each epoch: train loss/accuracy, test accuracy, epoch time, samples/s and the
cumulative cost, a checkpoint, and one batched MLflow write from rank 0. A worker
that dies is replaced and the group restarts from the last checkpoint;
`--resume` continues a stopped run the same way.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from trainers import driver
from trainers.driver import PROGRESS, RunContext
from trainers.pricing import Allocation, load_catalog
from trainers.specs import MnistConfig

TRAINER = "mnist"
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
    start_epoch, state = 0, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        start_epoch = state["epoch"]
    base_elapsed = driver.base_elapsed(state, cfg)
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


def prepare_trials(spec: MnistConfig, data_dir: Path) -> dict:
    """Before a search's trials start: nothing to share (each worker reads the data itself)."""
    return {}


def fit(spec: MnistConfig, ctx: RunContext) -> int:
    trainer = driver.torch_trainer(train_func, {}, spec, ctx)
    return driver.fit_and_report(trainer, ctx, lambda result: driver.finish(
        ctx, result, lambda metrics: _log_model(spec, ctx, result.checkpoint, metrics),
        {"test_accuracy": "test_accuracy", "cost_usd": "cost_usd", "epochs": "epoch"}))


def _log_model(spec: MnistConfig, ctx: RunContext, checkpoint, metrics: dict) -> None:
    """The weights and the width to rebuild MnistCNN with, artifact path `model` (no pickle)."""
    import mlflow
    import torch

    from trainers.registry import MODEL_DIR, write_model_files

    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, weights_only=True)["model"]
    with tempfile.TemporaryDirectory() as tmp:
        write_model_files(tmp, TRAINER, {"width": spec.width}, state)
        mlflow.set_tracking_uri(ctx.uri)
        with mlflow.start_run(run_id=ctx.run_id):
            mlflow.log_artifacts(tmp, artifact_path=MODEL_DIR)
            # Re-sent in case tracking dropped out mid-run; same step, so no duplicate point.
            mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "cost_usd") if k in metrics},
                               step=int(metrics.get("epoch", 0)))


def main(argv: list[str] | None = None) -> int:
    return driver.main(TRAINER, MnistConfig, fit, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
