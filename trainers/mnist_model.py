"""MNIST CNN and its step code: plain PyTorch, importable without Ray.

The Ray Train job (`trainers.mnist`) and the plain-loop benchmark run exactly this
code, so their throughput can be compared like for like.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistCNN(nn.Module):
    """One conv block at 28x28, two at 14x14, then a small classifier.

    Batch norm plus a one-cycle LR lets 2 epochs reach >= 99% test accuracy. A
    second conv at full resolution added 40% compute on CPU for no accuracy.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(1, w), nn.MaxPool2d(2),                           # 28 -> 14
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 14 -> 7
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * w * 7 * 7, 128),
                                  nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 28, 28] -> normalised float [N, 1, 28, 28]; labels -> int64."""
    return normalise(torch.from_numpy(images)), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float [N, 1, 28, 28], on the images' device."""
    return images.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float
    steps: int = 0          # steps of this epoch done when train_epoch returned, those skipped included
    stopped: bool = False   # should_stop ended the epoch early
    data_wait_s: float = 0.0  # of `seconds`, the time spent waiting for the next batch

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def shard_order(n: int, *, epoch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice of one shared permutation: every rank sees a disjoint part."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world  # equal shards keep DDP's all-reduce in step
    return perm[rank * per_rank:(rank + 1) * per_rank]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, x: torch.Tensor,
                y: torch.Tensor, *, batch_size: int, epoch: int, seed: int, rank: int = 0,
                world: int = 1, device: torch.device | str = "cpu", start_step: int = 0,
                should_stop: Callable[[int], bool] | None = None) -> EpochStats:
    """One pass over this rank's shard of tensors in memory. Batches are gathered by index: on CPU
    this is far cheaper than a per-sample DataLoader.

    `start_step` skips the batches a resumed epoch already trained (the order is fixed by
    epoch, seed, rank and world). `should_stop(steps_done)` is asked after every optimizer
    step but the epoch's last; True ends the epoch there (`stopped`, `steps`). The stats
    cover the batches of this call only."""
    order = shard_order(len(x), epoch=epoch, seed=seed, rank=rank, world=world)
    batches = ((x[idx], y[idx]) for idx in (order[i:i + batch_size]
                                            for i in range(start_step * batch_size, len(order), batch_size)))
    return train_batches(model, optimizer, scheduler, batches, steps=-(-len(order) // batch_size),
                         start_step=start_step, device=device, should_stop=should_stop)


def train_batches(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable,
                  *, steps: int, start_step: int = 0, device: torch.device | str = "cpu",
                  should_stop: Callable[[int], bool] | None = None) -> EpochStats:
    """The step code: one optimizer step per (images, labels) batch of `batches`, which starts at
    step `start_step` of an epoch of `steps` steps (in memory: `train_epoch`; streamed: a Ray Data
    shard). `should_stop` as in `train_epoch`."""
    model.train()
    total_loss, correct, seen, done, stopped = torch.zeros(()), 0, 0, start_step, False
    waited = 0.0
    start = time.perf_counter()
    it = iter(batches)
    while True:
        before = time.perf_counter()
        item = next(it, None)
        waited += time.perf_counter() - before
        if item is None:
            break
        xb, yb = item[0].to(device, non_blocking=True), item[1].to(device, non_blocking=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach().cpu() * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        done += 1
        if should_stop is not None and done < steps and should_stop(done):
            stopped = True
            break
    return EpochStats(loss=float(total_loss) / max(seen, 1), accuracy=correct / max(seen, 1),
                      samples=seen, seconds=time.perf_counter() - start, steps=done, stopped=stopped,
                      data_wait_s=waited)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> tuple[int, int, float]:
    """(correct, count, summed loss) so ranks can add up their shards."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct, len(x), loss


def make_optimizer(model: nn.Module, *, lr: float, total_steps: int, done_steps: int = 0):
    """Adam with a one-cycle schedule over the whole run (resumable at `done_steps`)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if total_steps < 2:  # one step has no cycle to run
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        # 20% warm-up; a very short run needs at least one step in each phase, or torch divides by zero.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                        pct_start=max(0.2, 1.5 / total_steps))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(min(done_steps, total_steps - 1)):
            scheduler.step()  # replays the LR curve only; cheap (no model work)
    return optimizer, scheduler
