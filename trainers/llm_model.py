"""The GPT-2-family model and its step code, without Ray: Ray Train workers and the
benchmark's plain loop run exactly these functions.

Text is grouped into fixed-length blocks; each optimizer step takes `grad_accum`
micro-batches; AdamW (no decay on biases and norms) with linear warmup then linear
decay to zero; bf16/fp16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Architectures by name. distilgpt2 is the real thing (pretrained on the hub, or the
# same architecture from scratch offline); tiny is for tests and quick searches.
PRESETS = {
    "distilgpt2": {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024},
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2, "n_positions": 256},
}


def context_length(name: str) -> int:
    return PRESETS[name]["n_positions"]


def build_model(name: str, vocab_size: int, *, offline: bool | None = None):
    """(model, source). distilgpt2: pretrained weights from the hub when reachable, else
    random weights in its architecture; the source says which, plainly."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from trainers.data import hub_reachable

    if name == "distilgpt2" and (not offline if offline is not None else hub_reachable()):
        try:
            return AutoModelForCausalLM.from_pretrained("distilgpt2"), "hf:distilgpt2"
        except OSError:
            pass  # unreachable after all: from scratch below, and the source says so
    config = GPT2Config(vocab_size=vocab_size, **PRESETS[name])
    return GPT2LMHeadModel(config), f"scratch:{name} (random init, no pretrained weights)"


def to_blocks(ids: np.ndarray, block_size: int, limit_tokens: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping blocks of `block_size` tokens (the ragged end dropped)."""
    if limit_tokens:
        ids = ids[:limit_tokens]
    n = len(ids) // block_size
    return torch.from_numpy(np.ascontiguousarray(ids[:n * block_size], dtype=np.int64).reshape(n, block_size))


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, done_steps: int = 0):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln_" in name or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=-1)
    with warnings.catch_warnings():  # stepping the schedule alone is the point here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        for _ in range(done_steps):  # resume: put the schedule where the checkpoint left it
            scheduler.step()
    return optimizer, scheduler


def autocast(device: torch.device, precision: str):
    """bf16 where the GPU has it, fp16 otherwise; nothing on CPU or with precision=fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()) \
        else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def batch_order(n_blocks: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


@dataclass
class StepStats:
    loss: float
    tokens: int
    seconds: float


def train_step(model, optimizer, scheduler, micro_batches: list[torch.Tensor], *, device: torch.device,
               amp, scaler) -> StepStats:
    """One optimizer step over `micro_batches` (gradient accumulation), clipped at norm 1."""
    start = time.perf_counter()
    model.train()
    total, tokens = 0.0, 0
    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        with amp:
            loss = model(input_ids=batch, labels=batch).loss / len(micro_batches)
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
        tokens += batch.numel()
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepStats(loss=total, tokens=tokens, seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, *, batch_size: int, max_batches: int, device: torch.device, amp
             ) -> tuple[float, int]:
    """(sum of token losses, tokens) over the first `max_batches` batches: callers all-reduce then divide."""
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(0, min(len(blocks), batch_size * max_batches), batch_size):
        batch = blocks[i:i + batch_size].to(device)
        with amp:
            loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]  # labels are shifted: one fewer prediction per row
        loss_sum += loss.float().item() * n
        count += n
    return loss_sum, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp of a diverged loss is not a number worth logging
