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
from trainers.ray_pipeline import SHUFFLE_BUFFER, epoch_batches, mnist_plan
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


def ids_of(iterator, seed: int) -> list[str]:
    out: list[str] = []
    for batch in iterator.iter_batches(batch_size=64, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                       local_shuffle_seed=seed):
        out += [str(i) for i in batch["id"]]
    return out


class TestRayDataShards:
    """The pipeline `--data-pipeline ray-data` hands Ray Train, on a local Ray."""

    def test_shards_are_disjoint_cover_the_data_and_repeat_with_the_seed(self, ray_start_2_cpus, data_dir):
        spec = MnistConfig(num_workers=2, cpus_per_worker=1, batch_size=64)
        plan = mnist_plan(spec, data_dir, None, train_samples=3000, ids=True)
        iterators = shard_iterators(plan, 2)
        first = [ids_of(it, seed=5) for it in iterators]
        assert [len(ids) for ids in first] == plan.rows_per_rank and min(plan.rows_per_rank) > 1000
        assert not set(first[0]) & set(first[1])
        assert set(first[0]) | set(first[1]) == {f"train#{i}" for i in range(3000)}
        assert [ids_of(it, seed=5) for it in iterators] == first            # same seed: same order, row for row
        other = ids_of(iterators[0], seed=6)                                   # another epoch's seed
        assert other != first[0] and sorted(other) == sorted(first[0])

    def test_a_resumed_epoch_goes_on_with_exactly_the_batches_it_had_left(self, ray_start_2_cpus, data_dir):
        spec = MnistConfig(num_workers=1, cpus_per_worker=1, batch_size=100)
        [shard] = shard_iterators(mnist_plan(spec, data_dir, None, train_samples=1500), 1)
        whole = list(epoch_batches(shard, epoch=1, seed=0, batch_size=100, start=0, steps=15))
        tail = list(epoch_batches(shard, epoch=1, seed=0, batch_size=100, start=6, steps=15))
        assert len(whole) == 15 and len(tail) == 9
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[6:], tail))

    def test_image_files_stream_from_ray_data_tasks(self, ray_start_2_cpus, tmp_path, monkeypatch):
        root = image_dir(tmp_path / "imgs", per_label=8)
        write_catalog(tmp_path, {"imgs": {"kind": "images", "source": str(root), "description": "d"}}, monkeypatch)
        ds = load_catalog().get("imgs")
        info = {"fingerprint": fingerprint(ds, tmp_path / "data").as_dict()}
        plan = mnist_plan(MnistConfig(num_workers=2, cpus_per_worker=1, dataset="imgs"), tmp_path / "data", info,
                          ids=True)
        ids = [ids_of(it, seed=0) for it in shard_iterators(plan, 2)]
        assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == info["fingerprint"]["train_rows"]
        assert all("/" in i and i.endswith(".png") for i in ids[0])


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
        assert profile["sha256"] == expected.sha256 and profile["train_rows_used"] == expected.train_rows
        assert client.get_run(sub.mlflow_run_id).data.params["dataset"] == "digits"
        runs.append(expected.sha256)
        (root / "7" / "3.png").write_bytes(png(seed=1234))  # the next run trains on changed data
    assert runs[0] != runs[1]
    assert np.isfinite(outcome.result["test_accuracy"])
