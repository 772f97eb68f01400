"""MNIST CNN on Ray Train, as a plain Ray job.

    ray job submit --working-dir . -- python -m trainers.mnist --epochs 2

Four units, as in Ray's own examples: data (`trainers.data`), the model and step
code (`trainers.mnist_model`, no Ray), `train_func` run by every worker, and the
driver (`fit` on top of `trainers.driver`) that takes the flags and owns the MLflow run.

Each epoch: train loss/accuracy, test accuracy, epoch time, samples/s and the
cumulative cost, a checkpoint, and one batched MLflow write from rank 0. A worker
that dies is replaced and the group restarts from the last checkpoint;
`--resume` continues a stopped run the same way. A drain request (`trainers.drain`)
checkpoints at the next step boundary mid-epoch and exits with DRAINED_EXIT; `--resume`
then continues at that very step, with the same batches, LR schedule and dropout stream,
so the run's epochs and their figures match an undisturbed run's.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
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
    from trainers.drain import DRAINED_METRIC, DrainWatch
    from trainers.phases import PhaseClock
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
    start_epoch, start_step, carry, state = 0, 0, None, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        if start_step and state.get("gang") != [world, per_rank_batch]:
            # The batch order inside an epoch depends on the gang: another one redoes that epoch.
            if rank == 0:
                print(f"{PROGRESS} NOTE: drained with another gang {state.get('gang')}: epoch {start_epoch + 1} "
                      "restarts from its first step", flush=True)
            start_step = 0
        carry = state.get("partial") if start_step else None
        if "rng" in state:  # the dropout stream goes on as if never interrupted
            torch.set_rng_state(state["rng"].cpu())
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"].cpu())
    base_elapsed = driver.base_elapsed(state, cfg)
    optimizer, scheduler = make_optimizer(model, lr=spec.lr, total_steps=spec.epochs * steps_per_epoch,
                                          done_steps=start_epoch * steps_per_epoch + start_step)
    if state:
        optimizer.load_state_dict(state["optimizer"])

    catalog = load_catalog(cfg["costs_file"])
    alloc = Allocation.for_workers(spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker)
    tracker = RunTracker(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 and cfg["run_id"] else None
    if tracker:
        tracker.log_params({"data_source": data.source, "device": str(device),
                            "train_size": len(x), "test_size": len(data.test_images[:spec.test_samples])})
        if start_epoch or start_step:
            tracker.set_tags({"oppen.resumed_from_epoch": start_epoch,
                              **({"oppen.resumed_from_step": start_step} if start_step else {})})
    if rank == 0:
        print(f"{PROGRESS} data={data.source} device={device} train={len(x)} test={len(tx) * world} "
              f"workers={world} start_epoch={start_epoch} start_step={start_step}", flush=True)

    watch = DrainWatch(cfg.get("submission_id"), rank=rank, world=world, device=device)

    def save_and_report(metrics: dict, epoch: int, step: int, elapsed: float, partial: list | None = None):
        """Rank 0 saves the state to resume at (`epoch`, `step`); every rank reports."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:  # one copy of the state is enough; DDP keeps ranks identical
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "step": step, "partial": partial, "gang": [world, per_rank_batch],
                            "rng": torch.get_rng_state(),
                            **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
                            "elapsed_s": elapsed, "base_elapsed_s": base_elapsed,
                            "segment_id": cfg["segment_id"], "width": spec.width}, Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        watch.checkpointed(time.time(), epoch, step, drained=bool(metrics.get(DRAINED_METRIC)))

    clock = PhaseClock()

    def stop_here(epoch: int) -> Callable[[int], bool]:
        # Asked after each step but an epoch's last: notes the first step's time, and drains if asked.
        return lambda step: clock.stepped() or (watch.enabled and watch.should_stop(epoch * steps_per_epoch + step))

    for epoch in range(start_epoch, spec.epochs):
        resumed = carry if epoch == start_epoch else None
        stats = train_epoch(model, optimizer, scheduler, x, y, batch_size=per_rank_batch, epoch=epoch,
                            seed=spec.seed, rank=rank, world=world, device=device,
                            start_step=start_step if epoch == start_epoch else 0, should_stop=stop_here(epoch))
        # This rank's [loss sum, correct, samples] so far in this epoch; rank 0 also carries the whole
        # gang's sums of the part a drained attempt trained, so the epoch's figures cover all of it.
        part = [stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples]
        if resumed and rank == 0:
            part = [a + b for a, b in zip(part, resumed[:3])]
        seconds = stats.seconds + (resumed[3] if resumed else 0.0)
        if stats.stopped:  # drain: every rank stopped at this same step
            sums = torch.tensor(part, dtype=torch.float64)
            if world > 1:
                dist.all_reduce(sums)
            elapsed = base_elapsed + (time.time() - cfg["segment_start"])
            if tracker:
                tracker.flush()  # params and tags; the epoch's metrics come when it ends
            metrics = {DRAINED_METRIC: 1, "drained_epoch": epoch, "drained_step": stats.steps, "elapsed_s": elapsed,
                       **catalog.cost(alloc, elapsed).as_metrics(),
                       **({"tracking_unsent": tracker.unsent, "tracking_s": tracker.seconds} if tracker else {})}
            save_and_report(metrics, epoch, stats.steps, elapsed, partial=[*sums.tolist(), seconds])
            if rank == 0:
                print(f"{PROGRESS} drain requested: checkpoint at epoch {epoch + 1}/{spec.epochs} "
                      f"step {stats.steps}/{steps_per_epoch}", flush=True)
            return
        correct, count, test_loss = evaluate(model, tx, ty, device=device)
        sums = torch.tensor([*part, correct, count, test_loss], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)  # the whole gang's numbers, not rank 0's share
        train_loss, train_correct, samples, correct, count, test_loss = sums.tolist()
        elapsed = base_elapsed + (time.time() - cfg["segment_start"])
        cost = catalog.cost(alloc, elapsed)
        metrics = {
            "epoch": epoch + 1, "train_loss": train_loss / samples, "train_accuracy": train_correct / samples,
            "test_loss": test_loss / count, "test_accuracy": correct / count, "epoch_time_s": seconds,
            "samples_per_s": samples / seconds, "elapsed_s": elapsed, **cost.as_metrics(),
        }
        if tracker:
            tracker.log_metrics(metrics, step=epoch + 1)
            tracker.set_tags(clock.tags())  # where this attempt's time went (trainers.phases)
            tracker.flush()
            metrics["tracking_unsent"] = tracker.unsent
            metrics["tracking_s"] = tracker.seconds
        save_and_report(metrics, epoch + 1, 0, elapsed)
        if rank == 0:
            print(f"{PROGRESS} epoch {epoch + 1}/{spec.epochs} train_loss={metrics['train_loss']:.4f} "
                  f"test_accuracy={metrics['test_accuracy']:.4f} epoch_time={seconds:.1f}s "
                  f"samples/s={metrics['samples_per_s']:.0f} cost=${cost.total_usd:.5f}", flush=True)


def _unwrap(model):
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- driver


def prepare_trials(spec: MnistConfig, data_dir: Path) -> dict:
    """Before a search's trials start: nothing to share (each worker reads the data itself)."""
    return {}


def fit(spec: MnistConfig, ctx: RunContext) -> int:
    trainer = driver.torch_trainer(train_func, {"submission_id": ctx.submission_id}, spec, ctx)
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
