"""Datasets on real Ray Data and a real platform: the streamed shards, and the MLflow input every run logs.

The first tests start a local Ray of their own (2 CPUs, shut down after) to run the Ray Data pipeline
the MNIST trainer's `--data-pipeline ray-data` hands Ray Train; the last submits MNIST jobs on a
dataset of the test's own to the platform (real Ray Train, real MLflow server).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.unit.test_datasets import image_dir, png, write_catalog
from trainers.dataset_catalog import load_catalog
from trainers.fingerprint import fingerprint
from trainers.ray_pipeline import EpochStream, mnist_plan
from trainers.specs import MnistConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="class")
def ray_start_2_cpus():
    """A local Ray of the class's own (`address="local"` never joins a platform's cluster), shut down
    before the platform test starts its own."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def shard_iterators(plan, world: int) -> list:
    """Each rank's DataIterator, as Ray Train's controller builds them from the plan's DataConfig."""
    return [d["train"] for d in plan.data_config.configure({"train": plan.dataset}, world_size=world,
                                                             worker_handles=None, worker_node_ids=None)]


def ids_by_epoch(iterator, plan, batch: int) -> list[list[str]]:
    """One pass over a rank's schedule: the row ids each epoch handed out, in order."""
    rows: list[str] = []
    for b in iterator.iter_batches(batch_size=batch):
        rows += [str(i) for i in b["id"]]
    per = plan.steps_per_epoch * batch
    assert len(rows) % per == 0
    return [rows[i:i + per] for i in range(0, len(rows), per)]


class TestRayDataShards:
    """The pipeline `--data-pipeline ray-data` hands Ray Train, on a local Ray."""

    def test_shards_are_disjoint_cover_the_data_and_repeat_with_the_seed(self, ray_start_2_cpus, data_dir):
        from trainers.byo import rank_of

        spec = MnistConfig(num_workers=2, cpus_per_worker=1, batch_size=64, epochs=2)
        plan = mnist_plan(spec, data_dir, None, train_samples=3000, ids=True)
        iterators = shard_iterators(plan, 2)
        runs = [ids_by_epoch(it, plan, 32) for it in iterators]            # [rank][epoch] -> ids
        split = [f"train#{i}" for i in range(3000)]
        shards = [{k for k, r in zip(split, rank_of(split, 2)) if r == rank} for rank in range(2)]
        assert sum(plan.rows_per_rank) == 3000 and [len(s) for s in shards] == plan.rows_per_rank
        for rank, epochs in enumerate(runs):
            assert len(epochs) == 2 and all(len(e) == plan.steps_per_epoch * 32 == len(set(e)) for e in epochs)
            assert all(set(e) <= shards[rank] for e in epochs)                 # its own shard only
            assert len(shards[rank]) - len(set(epochs[0])) < 32 + abs(plan.rows_per_rank[0] - plan.rows_per_rank[1])
            assert epochs[0] != epochs[1]                                      # each epoch its own order
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(split)
        assert [ids_by_epoch(it, plan, 32) for it in iterators] == runs       # same seed: same batches

    def test_a_resumed_epoch_goes_on_with_exactly_the_batches_it_had_left(self, ray_start_2_cpus, data_dir):
        spec = MnistConfig(num_workers=1, cpus_per_worker=1, batch_size=100, epochs=2)
        plan = mnist_plan(spec, data_dir, None, train_samples=1500)
        [shard] = shard_iterators(plan, 1)
        whole = EpochStream(shard, batch_size=100, steps=plan.steps_per_epoch, first_epoch=0)
        epoch0, epoch1 = list(whole.epoch(0)), list(whole.epoch(1))
        assert len(epoch0) == len(epoch1) == plan.steps_per_epoch == 15
        # A worker group restarted at epoch 1 step 6 over the same schedule: skips 21 batches.
        again = EpochStream(shard, batch_size=100, steps=15, first_epoch=0)
        tail = list(again.epoch(1, start=6))
        # A run resumed with --resume: the driver's schedule starts at epoch 1.
        later = mnist_plan(spec, data_dir, None, train_samples=1500, first_epoch=1)
        [shard1] = shard_iterators(later, 1)
        resumed = list(EpochStream(shard1, batch_size=100, steps=15, first_epoch=1).epoch(1, start=6))
        for got in (tail, resumed):
            assert len(got) == 9
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1[6:], got))
        assert not torch.equal(epoch0[0][1], epoch1[0][1])

    def test_image_files_stream_from_the_decoder(self, ray_start_2_cpus, tmp_path, monkeypatch):
        root = image_dir(tmp_path / "imgs", per_label=8)
        write_catalog(tmp_path, {"imgs": {"kind": "images", "source": str(root), "description": "d"}}, monkeypatch)
        ds = load_catalog().get("imgs")
        info = {"fingerprint": fingerprint(ds, tmp_path / "data").as_dict()}
        spec = MnistConfig(num_workers=2, cpus_per_worker=1, dataset="imgs", batch_size=8, epochs=1)
        plan = mnist_plan(spec, tmp_path / "data", info, ids=True)
        [ids0], [ids1] = (ids_by_epoch(it, plan, 4) for it in shard_iterators(plan, 2))
        assert not set(ids0) & set(ids1) and sum(plan.rows_per_rank) == info["fingerprint"]["train_rows"]
        assert all("/" in i and i.endswith(".png") for i in ids0)

    def test_text_is_tokenized_by_ray_data_into_the_memory_paths_blocks(self, ray_start_2_cpus, data_dir):
        import ray

        from trainers.llm_model import to_blocks
        from trainers.specs import LlmConfig
        from trainers.text_data import load_corpus, load_tokens
        from trainers.text_pipeline import text_plan
        from trainers.tokenizer import load_gpt2_tokenizer

        spec = LlmConfig(num_workers=2, cpus_per_worker=1, model="tiny", dataset="pydoc", block_size=64,
                         batch_size=4, grad_accum=2, max_steps=50, max_train_tokens=200_000)
        corpus = load_corpus(data_dir, "pydoc")
        text = text_plan(spec, corpus.train, corpus.validation, data_dir=data_dir, offline=True, ids=True)
        tokenizer, source = load_gpt2_tokenizer(data_dir, offline=True)
        memory = load_tokens(data_dir, "pydoc", tokenizer, source, offline=True)
        blocks = to_blocks(memory.train, 64, 200_000).numpy()
        assert text.train_tokens == blocks.size and text.validation_tokens == len(memory.validation)
        assert np.array_equal(ray.get(text.validation), memory.validation)
        plan = text.plan
        rows_per_step = 2 * 2  # per-rank batch x grad_accum
        assert plan.steps_per_epoch == min(plan.rows_per_rank) // rows_per_step
        epochs = -(-50 // plan.steps_per_epoch)
        seen = []
        for it in shard_iterators(plan, 2):
            got = list(it.iter_batches(batch_size=2))
            ids = np.concatenate([b["id"] for b in got]).astype(int)
            x = np.concatenate([b["x"] for b in got])
            assert len(ids) == epochs * plan.steps_per_epoch * rows_per_step    # equal steps on both ranks
            assert np.array_equal(x, blocks[ids])                              # the memory path's blocks
            assert x.dtype == np.int32                                         # half of int64's bytes
            seen.append(set(ids))
        assert not seen[0] & seen[1] and len(seen[0] | seen[1]) <= len(blocks)
        again = [np.concatenate([b["id"] for b in it.iter_batches(batch_size=2)]).astype(int)
                 for it in shard_iterators(plan, 2)]
        assert [set(a) for a in again] == seen                                  # same seed: same shards


def test_each_run_logs_its_dataset_with_its_hash_and_changed_data_shows_a_new_one(platform, tmp_path, monkeypatch):
    from ray_apps.training import follow, submit_training

    root = image_dir(tmp_path / "digits", per_label=20)
    write_catalog(tmp_path, {"mnist": {"kind": "images", "source": "builtin:mnist", "description": "d"},
                             "digits": {"kind": "images", "source": str(root), "description": "test digits"}},
                  monkeypatch)  # the jobs get OPPEN_DATASETS_FILE from the platform's job environment
    client = MlflowClient(platform.tracking_uri)
    runs = []
    for pipeline in ("memory", "ray-data"):
        expected = fingerprint(load_catalog().get("digits"), platform.data_dir)
        sub = submit_training(platform, "mnist", {"dataset": "digits", "data_pipeline": pipeline, "epochs": 1,
                                                  "batch_size": 32}, metadata={"tenant": "team-a"})
        outcome = follow(platform, sub.submission_id, on_progress=lambda line: None, poll_s=0.5, timeout_s=300)
        assert outcome.ok, "\n".join(outcome.log_tail)
        [given] = client.get_run(sub.mlflow_run_id).inputs.dataset_inputs
        assert (given.dataset.name, given.dataset.digest) == ("digits", expected.digest)
        assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}
        profile = json.loads(given.dataset.profile)
        assert profile["sha256"] == expected.sha256
        used = profile["train_rows_used"]  # ray-data: full batches an epoch, the rest wait for the next
        assert used == expected.train_rows if pipeline == "memory" else expected.train_rows - 32 < used <= expected.train_rows
        assert client.get_run(sub.mlflow_run_id).data.params["dataset"] == "digits"
        runs.append(expected.sha256)
        (root / "7" / "3.png").write_bytes(png(seed=1234))  # the next run trains on changed data
    assert runs[0] != runs[1]
    assert np.isfinite(outcome.result["test_accuracy"])


def test_a_two_worker_run_on_ray_data_reaches_the_accuracy_of_the_in_memory_run(platform):
    """Same gang, seed and data; the rows reach the workers in another order (per-block shuffles,
    hash-dealt shards), so the accuracies are close, not equal."""
    from ray_apps.training import follow, submit_training

    accuracy = {}
    for pipeline in ("memory", "ray-data"):
        sub = submit_training(platform, "mnist", {"num_workers": 2, "cpus_per_worker": 1, "epochs": 2,
                                                  "train_samples": 4000, "test_samples": 1000,
                                                  "data_pipeline": pipeline}, metadata={"tenant": "team-a"})
        outcome = follow(platform, sub.submission_id, on_progress=lambda line: None, poll_s=0.5, timeout_s=400)
        assert outcome.ok, "\n".join(outcome.log_tail)
        accuracy[pipeline] = outcome.result["test_accuracy"]
    assert accuracy["memory"] > 0.9 and abs(accuracy["ray-data"] - accuracy["memory"]) < 0.02, accuracy
