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
    """Run by every Ray Train worker, or in a one-worker Tune trial's own process (trainers.session)."""
    import torch
    import torch.distributed as dist

    from trainers import ingest
    from trainers.drain import DRAINED_METRIC, DrainWatch
    from trainers.mnist_model import MnistCNN, evaluate, make_optimizer, to_tensors, train_batches, train_epoch
    from trainers.phases import PhaseClock
    from trainers.ray_pipeline import EpochStream
    from trainers.session import current
    from trainers.tracking import RunTracker

    spec = MnistConfig(**cfg["spec"])
    session = current(cfg)  # a Ray Train worker, or a one-worker Tune trial's own process
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # use exactly what Ray reserved
    torch.manual_seed(spec.seed)
    device = session.device()

    dataset = ingest.info_for(spec, cfg)  # what the driver checked (trainers.ingest)
    data = ingest.load_images(cfg["data_dir"], dataset)
    tx, ty = to_tensors(data.test_images[:spec.test_samples], data.test_labels[:spec.test_samples])
    test_size = len(tx)
    tx, ty = tx[rank::world], ty[rank::world]  # each rank scores its share of the test set
    per_rank_batch = spec.batch_size // world
    streamed = cfg.get("stream")  # --data-pipeline ray-data: training images from a Ray Data shard
    if streamed:  # every rank takes the same number of full batches an epoch (trainers.ray_pipeline)
        import ray.train

        steps_per_epoch = streamed["steps_per_epoch"]
        stream = EpochStream(ray.train.get_dataset_shard("train"), batch_size=per_rank_batch,
                             steps=steps_per_epoch, first_epoch=streamed["first_epoch"], device=device)
        train_size = steps_per_epoch * per_rank_batch * world
    else:
        x, y = to_tensors(data.train_images[:spec.train_samples], data.train_labels[:spec.train_samples])
        train_size = len(x)
        steps_per_epoch = -(-(len(x) // world) // per_rank_batch)
    source = data.source
    del data

    model = session.prepare_model(MnistCNN(spec.width), device)  # + DDP when world > 1
    start_epoch, start_step, carry, state = 0, 0, None, None

    checkpoint = session.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        if start_step and (state.get("gang") != [world, per_rank_batch] or
                           state.get("pipeline", "memory") != spec.data_pipeline):
            # The batch order inside an epoch depends on the gang and the pipeline: another one redoes it.
            if rank == 0:
                print(f"{PROGRESS} NOTE: drained with another gang {state.get('gang')} or data pipeline "
                      f"{state.get('pipeline', 'memory')}: epoch {start_epoch + 1} restarts from its first step",
                      flush=True)
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
        tracker.log_params({"data_source": source, "device": str(device),
                            "train_size": train_size, "test_size": test_size})
        # The MLflow input: which data (by content hash) made this model.
        tracker.log_dataset(ingest.mlflow_input(dataset, train_rows_used=train_size, test_rows_used=test_size))
        if start_epoch or start_step:
            tracker.set_tags({"oppen.resumed_from_epoch": start_epoch,
                              **({"oppen.resumed_from_step": start_step} if start_step else {})})
    if rank == 0:
        print(f"{PROGRESS} data={source} device={device} train={train_size} test={test_size} "
              f"workers={world} pipeline={spec.data_pipeline} start_epoch={start_epoch} start_step={start_step}",
              flush=True)

    watch = DrainWatch(cfg.get("submission_id"), rank=rank, world=world, device=device)

    def save_and_report(metrics: dict, epoch: int, step: int, elapsed: float, partial: list | None = None):
        """Rank 0 saves the state to resume at (`epoch`, `step`); every rank reports."""
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:  # one copy of the state is enough; DDP keeps ranks identical
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "step": step, "partial": partial, "gang": [world, per_rank_batch],
                            "pipeline": spec.data_pipeline,
                            "rng": torch.get_rng_state(),
                            **({"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
                            "elapsed_s": elapsed, "base_elapsed_s": base_elapsed,
                            "segment_id": cfg["segment_id"], "width": spec.width}, Path(tmp) / CHECKPOINT_FILE)
                if epoch == spec.epochs and not step:
                    write_final_model(tmp, spec.width, _unwrap(model))
                saved = tmp
            session.report(metrics, saved)
        watch.checkpointed(time.time(), epoch, step, drained=bool(metrics.get(DRAINED_METRIC)))

    clock = PhaseClock()

    def stop_here(epoch: int) -> Callable[[int], bool]:
        # Asked after each step but an epoch's last: notes the first step's time, and drains if asked.
        return lambda step: clock.stepped() or (watch.enabled and watch.should_stop(epoch * steps_per_epoch + step))

    for epoch in range(start_epoch, spec.epochs):
        resumed = carry if epoch == start_epoch else None
        first = start_step if epoch == start_epoch else 0
        if streamed:  # the same step code over the shard's batches
            stats = train_batches(model, optimizer, scheduler, stream.epoch(epoch, start=first),
                                  steps=steps_per_epoch, start_step=first, device=device,
                                  should_stop=stop_here(epoch))
        else:
            stats = train_epoch(model, optimizer, scheduler, x, y, batch_size=per_rank_batch, epoch=epoch,
                                seed=spec.seed, rank=rank, world=world, device=device, start_step=first,
                                should_stop=stop_here(epoch))
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
            if streamed:
                stream.close()
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
            "data_wait_fraction": stats.data_wait_s / max(stats.seconds, 1e-9),  # this epoch, this rank (0)
        }
        if tracker:
            tracker.log_metrics(metrics, step=epoch + 1)
            tracker.set_tags(clock.tags())  # where this attempt's time went (trainers.phases)
            tracker.flush()
            metrics["tracking_unsent"] = tracker.unsent
            metrics["tracking_s"] = tracker.seconds
        if rank == 0:  # before the checkpoint: a worker lost after it was kept has said so
            print(f"{PROGRESS} epoch {epoch + 1}/{spec.epochs} train_loss={metrics['train_loss']:.4f} "
                  f"test_accuracy={metrics['test_accuracy']:.4f} epoch_time={seconds:.1f}s "
                  f"samples/s={metrics['samples_per_s']:.0f} data_wait={metrics['data_wait_fraction']:.1%} "
                  f"cost=${cost.total_usd:.5f}", flush=True)
        save_and_report(metrics, epoch + 1, 0, elapsed)


def _unwrap(model):
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- driver


def prepare_trials(spec: MnistConfig, data_dir: Path) -> dict:
    """Before a search's trials start: the dataset, checked once for all of them."""
    from trainers import ingest
    from trainers.specs import SpecError

    if spec.data_pipeline == "ray-data":
        raise SpecError("--data-pipeline ray-data is not available in a search yet: its trials train in memory. "
                        "To fix: drop the flag from the search.", field="params.data_pipeline")
    return {"dataset": ingest.prepare(spec, data_dir)}


def fit(spec: MnistConfig, ctx: RunContext) -> int:
    loop: dict = {"submission_id": ctx.submission_id, "dataset": ctx.dataset}
    data: dict = {}
    if spec.data_pipeline == "ray-data":  # the descriptors and their sharding; Ray Data decodes as workers read
        from trainers.ray_pipeline import mnist_plan

        first = _resume_epoch(ctx) if ctx.resume else 0
        plan = mnist_plan(spec, ctx.data_dir, ctx.dataset, train_samples=spec.train_samples, first_epoch=first)
        loop["stream"] = plan.stream()
        data = {"datasets": {"train": plan.dataset}, "dataset_config": plan.data_config}
        print(f"{PROGRESS} ray-data pipeline: {sum(plan.rows_per_rank):,} training rows over "
              f"{spec.num_workers} worker(s) ({', '.join(map(str, plan.rows_per_rank))}), "
              f"{plan.steps_per_epoch} steps an epoch from epoch {first + 1}", flush=True)
    trainer = driver.torch_trainer(train_func, loop, spec, ctx, **data)
    return driver.fit_and_report(trainer, ctx, lambda result: driver.finish(
        ctx, result, lambda metrics: _log_model(ctx, result.checkpoint, metrics),
        {"test_accuracy": "test_accuracy", "cost_usd": "cost_usd", "epochs": "epoch"}))


def _resume_epoch(ctx: RunContext) -> int:
    """The epoch (0-based) the run's last checkpoint resumes in, from Ray Train's checkpoint snapshot;
    0 when it cannot tell (the stream then skips to the checkpoint, which costs reading, not results)."""
    import json

    from trainers.drain import drained_position
    from trainers.runtime import checkpoint_root

    try:
        snapshot = json.loads((checkpoint_root(ctx.data_dir) / ctx.run_name /
                               "checkpoint_manager_snapshot.json").read_text())
        metrics = snapshot["checkpoint_results"][-1]["metrics"]
        drained = drained_position(metrics)
        return int(drained[0]) if drained else int(metrics["epoch"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


def write_final_model(checkpoint_dir: str | Path, width: int, model) -> None:
    """The model the driver logs, in the platform's stored form, beside the last epoch's state."""
    from trainers.registry import MODEL_DIR, write_model_files

    folder = Path(checkpoint_dir) / MODEL_DIR
    folder.mkdir()
    write_model_files(folder, TRAINER, {"width": width}, model.state_dict())


def _log_model(ctx: RunContext, checkpoint, metrics: dict) -> None:
    """The weights and the width to rebuild MnistCNN with (no pickle), artifact path `model`: rank 0
    wrote them with the last epoch's checkpoint, so this process needs no torch."""
    import mlflow

    from trainers.registry import MODEL_DIR, check_model_files

    with checkpoint.as_directory() as ckpt_dir:
        folder = Path(ckpt_dir) / MODEL_DIR
        check_model_files([p.name for p in folder.glob("*")], TRAINER, "the last checkpoint's model")
        mlflow.set_tracking_uri(ctx.uri)
        with mlflow.start_run(run_id=ctx.run_id):
            mlflow.log_artifacts(str(folder), artifact_path=MODEL_DIR)
            # Re-sent in case tracking dropped out mid-run; same step, so no duplicate point.
            mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "cost_usd") if k in metrics},
                               step=int(metrics.get("epoch", 0)))


def main(argv: list[str] | None = None) -> int:
    return driver.main(TRAINER, MnistConfig, fit, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    driver.exit_now(main())
