import pytest
import torch

from trainers.data import load_mnist
from trainers.mnist_model import MnistCNN, evaluate, make_optimizer, shard_order, to_tensors, train_epoch


def test_shards_are_disjoint_and_cover_the_data():
    parts = [shard_order(1000, epoch=3, seed=1, rank=r, world=4) for r in range(4)]
    joined = torch.cat(parts)
    assert len(set(joined.tolist())) == 1000
    assert not torch.equal(shard_order(1000, epoch=3, seed=1), shard_order(1000, epoch=4, seed=1))


def test_one_epoch_on_real_digits_learns(mnist_cache):
    torch.manual_seed(0)
    a = load_mnist(mnist_cache)
    x, y = to_tensors(a.train_images[:3000], a.train_labels[:3000])
    tx, ty = to_tensors(a.test_images[:1000], a.test_labels[:1000])
    model = MnistCNN(width=8)
    before = evaluate(model, tx, ty)[0]
    opt, sched = make_optimizer(model, lr=3e-3, total_steps=3000 // 64 + 1)
    stats = train_epoch(model, opt, sched, x, y, batch_size=64, epoch=0, seed=0)
    correct, count, _ = evaluate(model, tx, ty)
    assert stats.samples == 3000 and stats.samples_per_s > 0
    assert correct / count > 0.8 > before / count


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_resumed_schedule_matches_an_unbroken_one():
    model = MnistCNN(width=4)
    _, full = make_optimizer(model, lr=1e-2, total_steps=100)
    lrs = []
    for _ in range(60):
        lrs.append(full.get_last_lr()[0])
        full.step()
    _, resumed = make_optimizer(MnistCNN(width=4), lr=1e-2, total_steps=100, done_steps=40)
    assert resumed.get_last_lr()[0] == lrs[40]


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 6, 7, 100])
def test_the_schedule_runs_every_step_of_a_very_short_run(total_steps):
    """600 images at batch 128 is 5 steps: OneCycleLR's 20% warm-up alone would divide by zero there."""
    model = MnistCNN(4)
    optimizer, scheduler = make_optimizer(model, lr=0.01, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert len(lrs) == total_steps and max(lrs) <= 0.01 + 1e-12 and all(lr > 0 for lr in lrs)
    if total_steps >= 3:
        assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)  # a warm-up and a decay
