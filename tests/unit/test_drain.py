"""Draining a trainer (trainers.drain): keys, the watch, a step-boundary stop and an exact resume.

No Ray cluster: the KV store is a dict, and `train_func` runs under a stand-in for the few
`ray.train` calls it makes (context, device, checkpoint in / report out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from trainers import drain
from trainers.drain import DRAINED_EXIT, CheckpointRecord, DrainWatch, checkpoint_key, drain_key
from trainers.mnist_model import shard_order, train_epoch


class DictKV:
    def __init__(self, fail: bool = False):
        self.data: dict[bytes, bytes] = {}
        self.gets = 0
        self.fail = fail

    def get(self, key: bytes) -> bytes | None:
        self.gets += 1
        if self.fail:
            raise ConnectionError("GCS away")
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- contract


def test_keys_are_bytes_in_one_place():
    assert drain_key("mnist-20260101-000000-abc123") == b"oppen/drain/mnist-20260101-000000-abc123"
    assert checkpoint_key("mnist-x") == b"oppen/checkpoint/mnist-x"
    assert drain.NAMESPACE == "oppen" and DRAINED_EXIT == 75


def test_checkpoint_record_round_trips_and_ignores_garbage():
    rec = CheckpointRecord(at=12.5, epoch=1, step=7, drained=True, drain_requested_at=10.0)
    assert json.loads(rec.to_bytes()) == {"at": 12.5, "epoch": 1, "step": 7, "drained": True,
                                          "drain_requested_at": 10.0}
    assert CheckpointRecord.from_bytes(rec.to_bytes()) == rec
    for bad in (None, b"", b"not json", b"[]", b'{"at": 1}'):
        assert CheckpointRecord.from_bytes(bad) is None


# --------------------------------------------------------------------------- the watch


def test_without_a_submission_id_it_never_stops_and_never_reads_the_store():
    watch = DrainWatch(None, world=1)
    assert watch.kv is None and not watch.enabled
    assert not any(watch.should_stop(s) for s in range(1000))
    watch.checkpointed(1.0, 0, 5, drained=True)  # nothing to write to, and no error
    assert watch.polls == 0
    # world > 1 without an id: no collective either (torch.distributed is not initialised here)
    assert not DrainWatch("", world=4, rank=1).should_stop(3)


def test_rank_0_reads_at_most_every_poll_s_and_stops_once_asked():
    kv, clock = DictKV(), Clock()
    watch = DrainWatch("job-1", poll_s=1.0, kv=kv, clock=clock)
    assert not watch.should_stop(1) and kv.gets == 1
    for step in range(2, 50):  # many fast steps inside one poll period: no more reads
        clock.t += 0.01
        assert not watch.should_stop(step)
    assert kv.gets == 1
    kv.put(drain_key("job-1"), json.dumps({"at": 1234.5}).encode())
    clock.t += 0.6  # 1.08 s since the last read
    assert watch.should_stop(50) and kv.gets == 2 and watch.requested_at == 1234.5
    assert watch.should_stop(51) and kv.gets == 2  # stays stopped without reading again


def test_the_checkpoint_record_says_when_and_where_and_answers_the_request():
    kv, clock = DictKV(), Clock()
    watch = DrainWatch("job-2", kv=kv, clock=clock)
    watch.checkpointed(50.0, 1, 0)
    assert CheckpointRecord.from_bytes(kv.data[checkpoint_key("job-2")]) == CheckpointRecord(50.0, 1, 0)
    kv.put(drain_key("job-2"), json.dumps({"at": 60.0}).encode())
    assert watch.should_stop(9)
    watch.checkpointed(61.0, 1, 9, drained=True)
    assert CheckpointRecord.from_bytes(kv.data[checkpoint_key("job-2")]) == CheckpointRecord(61.0, 1, 9, True, 60.0)
    other = DictKV()
    DrainWatch("job-2", rank=1, world=2, kv=other).checkpointed(61.0, 1, 9)
    assert other.data == {}  # only rank 0 writes


def test_a_store_that_fails_never_stops_training():
    kv, clock = DictKV(fail=True), Clock()
    watch = DrainWatch("job-3", kv=kv, clock=clock)
    for step in range(1, 5):
        clock.t += 2
        assert not watch.should_stop(step)
    assert kv.gets == 4
    watch.checkpointed(1.0, 0, 1)  # a failed write is logged, not raised


def _gang_member(rank: int, world: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    kv = DictKV()

    class AskLater(DictKV):
        def get(self, key):
            self.gets += 1
            return json.dumps({"at": 1.0}).encode() if self.gets >= 3 else None

    watch = DrainWatch("gang", poll_s=0.002, rank=rank, world=world, kv=AskLater() if rank == 0 else kv,
                       max_interval=5)
    stopped_at, step = None, 0
    while stopped_at is None and step < 10_000:
        step += 1
        import time

        time.sleep(0.001)  # a "training step"
        if watch.should_stop(step):
            stopped_at = step
    results.put((rank, stopped_at, kv.gets))
    dist.destroy_process_group()


def test_every_rank_of_a_gang_stops_at_the_same_step():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gang_member, args=(r, 3, port, results)) for r in range(3)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    steps = {stopped for _, stopped, _ in got}
    assert len(steps) == 1 and None not in steps, got
    assert all(gets == 0 for rank, _, gets in got if rank)  # only rank 0 reads the store


# --------------------------------------------------------------------------- platform side


class FakeGcs:
    """GcsClient's KV calls, as the installed Ray spells them."""

    def __init__(self):
        self.data: dict[tuple[bytes, bytes], bytes] = {}

    def internal_kv_put(self, key, value, overwrite=False, namespace=None, timeout=None):
        assert isinstance(key, bytes) and isinstance(value, bytes) and namespace == b"oppen"
        self.data[(namespace, key)] = value
        return 1

    def internal_kv_multi_get(self, keys, namespace=None, timeout=None):
        return {k: self.data[(namespace, k)] for k in keys if (namespace, k) in self.data}

    def internal_kv_del(self, key, del_by_prefix, namespace=None, timeout=None):
        return int(self.data.pop((namespace, key), None) is not None)


def test_platform_side_request_read_acknowledge_clear(monkeypatch):
    gcs = FakeGcs()
    monkeypatch.setattr(drain, "_gcs", lambda address: gcs)
    assert drain.last_checkpoints("h:1", ["a", "b"]) == {} and drain.last_checkpoints("h:1", []) == {}

    def worker_put(key, value):  # what a worker's DrainWatch writes, into the same store
        gcs.internal_kv_put(key, value, True, b"oppen")

    kv = types.SimpleNamespace(get=lambda k: gcs.data.get((b"oppen", k)), put=worker_put)
    watch = DrainWatch("a", kv=kv, clock=Clock())
    watch.checkpointed(10.0, 1, 0)
    assert drain.last_checkpoints("h:1", ["a", "b"]) == {"a": 10.0}
    assert drain.drain_acknowledged("h:1", "a") is None

    drain.request_drain("h:1", "a", 20.0)
    assert json.loads(gcs.data[(b"oppen", b"oppen/drain/a")]) == {"at": 20.0}
    assert drain.drain_acknowledged("h:1", "a") is None  # asked, not answered yet
    assert watch.should_stop(5)
    watch.checkpointed(21.0, 1, 5, drained=True)
    assert drain.drain_acknowledged("h:1", "a") == CheckpointRecord(21.0, 1, 5, True, 20.0)
    assert drain.checkpoint_records("h:1", ["a"])["a"].step == 5

    drain.request_drain("h:1", "a", 30.0)  # a later request is not answered by the earlier drain
    assert drain.drain_acknowledged("h:1", "a") is None
    drain.clear("h:1", "a")
    assert gcs.data == {} and drain.last_checkpoints("h:1", ["a"]) == {}


def test_an_unreachable_gcs_fails_fast():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="nothing answers"):
        drain.request_drain(f"127.0.0.1:{port}", "a", 1.0)


# --------------------------------------------------------------------------- step boundary


class Recorder(nn.Module):
    """Logits from a linear layer; remembers which samples (x holds each sample's index) it saw."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 10)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen += x[:, 0, 0, 0].long().tolist()
        return self.lin(x[:, 0, 0, :1] * 0)


def _indexed(n: int):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 1, 1).clone()
    return x, torch.zeros(n, dtype=torch.long)


def test_the_hook_stops_at_the_step_it_answers_true():
    x, y = _indexed(100)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    asked = []

    def stop(step):
        asked.append(step)
        return step == 4

    stats = train_epoch(model, opt, None, x, y, batch_size=8, epoch=2, seed=3, should_stop=stop)
    assert stats.stopped and stats.steps == 4 and stats.samples == 32 and asked == [1, 2, 3, 4]
    assert model.seen == shard_order(100, epoch=2, seed=3)[:32].tolist()


def test_the_hook_is_not_asked_after_the_last_step():
    x, y = _indexed(20)
    model = Recorder()
    asked = []
    stats = train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), None, x, y, batch_size=8, epoch=0,
                        seed=0, should_stop=lambda s: asked.append(s) or True if s == 99 else asked.append(s))
    assert asked == [1, 2] and stats.steps == 3 and not stats.stopped and stats.samples == 20


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
def test_a_resumed_epoch_trains_exactly_the_remaining_batches(world, rank):
    x, y = _indexed(101)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = train_epoch(model, opt, None, x, y, batch_size=5, epoch=1, seed=7, rank=rank, world=world,
                        should_stop=lambda s: s == 3)
    rest = train_epoch(model, opt, None, x, y, batch_size=5, epoch=1, seed=7, rank=rank, world=world,
                       start_step=first.steps)
    whole = shard_order(101, epoch=1, seed=7, rank=rank, world=world).tolist()
    assert model.seen == whole and first.samples + rest.samples == len(whole)
    assert rest.steps == -(-len(whole) // 5) and not rest.stopped


# --------------------------------------------------------------------------- train_func under a fake Ray


class FakeTrain:
    """The parts of ray.train that trainers.mnist.train_func calls; reports and checkpoints are kept."""

    def __init__(self, store: Path):
        self.store, self.reports, self.latest = store, [], None

        class Checkpoint:
            def __init__(self, path):
                self.path = Path(path)

            @classmethod
            def from_directory(cls, path):
                return cls(path)

            @contextlib.contextmanager
            def as_directory(self):
                yield str(self.path)

        self.Checkpoint = Checkpoint
        self.torch = types.SimpleNamespace(get_device=lambda: torch.device("cpu"), prepare_model=lambda m, move_to_device=True: m)

    def get_context(self):
        return types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)

    def get_checkpoint(self):
        return self.latest

    def report(self, metrics, checkpoint=None):
        if checkpoint is not None:
            kept = self.store / f"checkpoint_{len(list(self.store.iterdir())):03d}"
            shutil.copytree(checkpoint.path, kept)
            self.latest = self.Checkpoint(kept)
        self.reports.append(dict(metrics))


@pytest.fixture()
def fake_ray(monkeypatch, tmp_path):
    def install(store: Path) -> FakeTrain:
        fake = FakeTrain(store)
        store.mkdir(parents=True, exist_ok=True)
        ray_mod = types.ModuleType("ray")
        train_mod = types.ModuleType("ray.train")
        for name in ("get_context", "get_checkpoint", "report", "Checkpoint", "torch"):
            setattr(train_mod, name, getattr(fake, name))
        ray_mod.train = train_mod
        monkeypatch.setitem(sys.modules, "ray", ray_mod)
        monkeypatch.setitem(sys.modules, "ray.train", train_mod)
        monkeypatch.setitem(sys.modules, "ray.train.torch", fake.torch)
        return fake

    return install


def _cfg(data_dir: Path, submission_id: str | None, epochs: int = 2) -> dict:
    from trainers.pricing import load_catalog
    from trainers.specs import MnistConfig

    spec = MnistConfig(epochs=epochs, batch_size=64, width=4, train_samples=640, test_samples=200,
                       cpus_per_worker=1)
    return {"spec": dataclasses.asdict(spec), "data_dir": str(data_dir), "costs_file": str(load_catalog().source),
            "tracking_uri": "", "run_id": None, "segment_start": time.time(), "segment_id": "seg",
            "submission_id": submission_id}


def test_a_drained_mnist_run_resumes_at_its_step_and_ends_as_an_undisturbed_run(fake_ray, tmp_path, data_dir,
                                                                                monkeypatch):
    from trainers import mnist

    # The undisturbed run.
    plain = fake_ray(tmp_path / "plain")
    mnist.train_func(_cfg(data_dir, None))
    assert [r["epoch"] for r in plain.reports] == [1, 2]

    # Drained in the 2nd epoch after 4 of its 10 steps, then resumed from that checkpoint.
    kv, clock = DictKV(), Clock()
    steps = []

    class Watch(DrainWatch):
        def __init__(self, submission_id, **kw):
            super().__init__(submission_id, **kw, kv=kv, clock=clock, poll_s=0.0)

        def should_stop(self, step):
            steps.append(step)
            if step == 14:  # global step: epoch 1 (0-based) x 10 steps + 4
                kv.put(drain_key(self.submission_id), json.dumps({"at": 5.0}).encode())
            return super().should_stop(step)

    monkeypatch.setattr(drain, "DrainWatch", Watch)
    first = fake_ray(tmp_path / "run")
    mnist.train_func(_cfg(data_dir, "job-a"))
    assert steps == [*range(1, 10), *range(11, 15)]  # never after an epoch's last step
    assert [r.get("epoch") for r in first.reports] == [1, None]
    drained = first.reports[-1]
    assert drained["drained"] == 1 and (drained["drained_epoch"], drained["drained_step"]) == (1, 4)
    assert CheckpointRecord.from_bytes(kv.data[checkpoint_key("job-a")]) == CheckpointRecord(
        at=pytest.approx(CheckpointRecord.from_bytes(kv.data[checkpoint_key("job-a")]).at), epoch=1, step=4,
        drained=True, drain_requested_at=5.0)
    from trainers.driver import PROGRESS

    second = fake_ray(tmp_path / "run")
    second.latest = first.latest
    steps.clear()
    mnist.train_func(_cfg(data_dir, "job-a-2"))
    assert steps == list(range(15, 20))  # the remaining 6 steps: 15..19 asked, not after the 20th
    assert [r["epoch"] for r in second.reports] == [2]
    want, got = plain.reports[-1], second.reports[-1]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        # The same batches, LR steps, dropout stream and weights: the same epoch, to float rounding.
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert PROGRESS  # the progress prefix the integration test reads


def test_a_run_outside_a_ray_job_never_builds_a_store_client(fake_ray, tmp_path, data_dir, monkeypatch):
    from trainers import mnist

    monkeypatch.setattr(drain, "RayWorkerKV", lambda: pytest.fail("no submission id: no store"))
    fake = fake_ray(tmp_path / "x")
    mnist.train_func(_cfg(data_dir, None, epochs=1))
    assert [r["epoch"] for r in fake.reports] == [1]


# --------------------------------------------------------------------------- the driver


def test_a_drained_result_exits_75_without_logging_a_model(capsys, tmp_path):
    from trainers import driver

    ctx = driver.RunContext("mnist", "run-1", tmp_path, "", "http://127.0.0.1:1", "abc", False, "sub-1")
    result = types.SimpleNamespace(metrics={"drained": 1, "drained_epoch": 1, "drained_step": 7}, checkpoint=None)
    trainer = types.SimpleNamespace(fit=lambda: result)
    code = driver.fit_and_report(trainer, ctx, lambda r: pytest.fail("a drained run logs no model"))
    out = capsys.readouterr().out
    assert code == DRAINED_EXIT
    assert "[oppen] drained at epoch 2 step 7: resumes from this checkpoint" in out
    assert driver.RESULT not in out

    done = types.SimpleNamespace(metrics={"epoch": 2}, checkpoint=None)
    assert driver.fit_and_report(types.SimpleNamespace(fit=lambda: done), ctx, lambda r: {"epochs": 2}) == 0
    assert driver.result_of(capsys.readouterr().out.splitlines())["epochs"] == 2


def test_a_drained_llm_run_resumes_at_its_optimizer_step(fake_ray, tmp_path, data_dir, mnist_cache, monkeypatch,
                                                         capsys):
    from trainers import llm
    from trainers.pricing import load_catalog
    from trainers.specs import LlmConfig

    from trainers.tokenizer import load_gpt2_tokenizer

    load_gpt2_tokenizer(mnist_cache, offline=True)  # rebuilt once per machine into the test cache
    shutil.copytree(mnist_cache / "tokenizers", data_dir / "tokenizers")
    spec = LlmConfig(model="tiny", dataset="pydoc", block_size=32, batch_size=4, max_steps=6, eval_every=4,
                     eval_batches=1, max_train_tokens=4096, warmup_steps=0, cpus_per_worker=1)

    def cfg(submission_id):
        return {"spec": dataclasses.asdict(spec), "data_dir": str(data_dir), "costs_file": str(load_catalog().source),
                "tracking_uri": "", "run_id": None, "segment_start": time.time(), "segment_id": "seg",
                "offline": True, "submission_id": submission_id}

    kv, asked = DictKV(), []

    class Watch(DrainWatch):
        def __init__(self, submission_id, **kw):
            super().__init__(submission_id, **kw, kv=kv, clock=Clock(), poll_s=0.0)

        def should_stop(self, step):
            asked.append(step)
            if step == 2:
                kv.put(drain_key(self.submission_id), json.dumps({"at": 1.0}).encode())
            return super().should_stop(step)

    monkeypatch.setattr(drain, "DrainWatch", Watch)
    first = fake_ray(tmp_path / "run")
    llm.train_func(cfg("job-l"))
    assert asked == [1, 2] and [r.get("step") for r in first.reports] == [2]
    assert first.reports[0]["drained"] == 1
    second = fake_ray(tmp_path / "run")
    second.latest = first.latest
    asked.clear()
    llm.train_func(cfg("job-l-2"))
    assert asked == [3, 5]  # steps 4 and 6 evaluate and checkpoint instead
    assert [r["step"] for r in second.reports] == [4, 6]
    assert "start_step=2" in capsys.readouterr().out
    record = CheckpointRecord.from_bytes(kv.data[checkpoint_key("job-l-2")])
    assert record is not None and not record.drained  # the last checkpoint: step 6, a normal one
