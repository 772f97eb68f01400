"""The Ray Data path's sharding and schedule, without Ray: the descriptors and each rank's decoder are
plain Python. Every rank's shard is disjoint from the others', together they are exactly the
in-memory path's training split, each epoch gives every rank the same number of full batches, and
the rows decode to the same normalised pixels. (tests/integration/test_datasets.py runs them on Ray.)"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.unit.test_datasets import image_dir, write_catalog
from trainers import byo, ingest
from trainers.dataset_catalog import load_catalog
from trainers.fingerprint import fingerprint
from trainers.mnist_model import normalise, to_tensors
from trainers.ray_pipeline import BLOCK_ROWS, _expanded_ranks, _RankDecoder, descriptor_table, epoch_order
from trainers.specs import MnistConfig


def run_epoch(table, kind, source, world: int, epoch: int, per_rank_batch: int, seed: int = 0) -> list[dict]:
    """What each rank's decoder hands out over one epoch, following the schedule mnist_plan builds."""
    step = BLOCK_ROWS[kind]
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    counts = np.stack([np.bincount(_expanded_ranks(b, kind), minlength=world) for b in blocks])
    steps = int(counts.sum(axis=0).min()) // per_rank_batch
    left = np.full(world, steps * per_rank_batch)
    out = [{"x": [], "y": [], "id": []} for _ in range(world)]
    decoders = [_RankDecoder(rank=r, kind=kind, source=source, seed=seed, ids=True, blocks=blocks)
                for r in range(world)]
    for block in epoch_order(seed, epoch, len(blocks)):
        keep = np.minimum(counts[block], left)
        left -= keep
        for r in range(world):
            got = decoders[r].decode(epoch, int(block), int(keep[r]))
            for key in out[r]:
                out[r][key].append(got[key])
    return [{k: np.concatenate(v) for k, v in o.items()} | {"steps": steps, "rows": int(counts[:, r].sum()),
            "shard": {str(i) for i, rk in zip(table.column("id").to_pylist() if kind != "fragments" else [],
                                               _expanded_ranks(table, kind)) if rk == r}}
            for r, o in enumerate(out)]


def check(out: list[dict], split: set[str], per_rank_batch: int):
    ids = [set(o["id"]) for o in out]
    assert all(len(o["id"]) == len(i) == o["steps"] * per_rank_batch for o, i in zip(out, ids))  # full batches
    assert not set.intersection(*ids) and set.union(*ids) <= split                                 # disjoint
    # All but the rows past the smallest shard's full batches: each rank's last < batch, and what a
    # bigger shard holds beyond the smallest (a hash deals a little unevenly); a different few each epoch.
    smallest = min(o["rows"] for o in out)
    assert len(split) - len(set.union(*ids)) == sum(o["rows"] - o["steps"] * per_rank_batch for o in out)
    assert all(smallest - o["steps"] * per_rank_batch < per_rank_batch for o in out)


def test_builtin_shards_cover_the_split_and_decode_like_the_memory_path(data_dir):
    spec = MnistConfig(num_workers=3, cpus_per_worker=1, batch_size=30)
    table, kind, source = descriptor_table(spec, data_dir, None, train_samples=2600)
    out = run_epoch(table, kind, source, 3, epoch=0, per_rank_batch=10)
    split = {f"train#{i}" for i in range(2600)}
    check(out, split, 10)
    assert set.union(*(o["shard"] for o in out)) == split  # the shards themselves cover it all
    assert all(set(o["id"]) <= o["shard"] for o in out)
    a = ingest.load_images(data_dir, None)
    index = [int(k.split("#")[1]) for k in out[1]["id"]]
    assert np.array_equal(out[1]["x"], a.train_images[index]) and out[1]["y"].tolist() == a.train_labels[index].tolist()
    # The worker's normalising of what arrives is the memory path's.
    x, _ = to_tensors(a.train_images[index[:8]], a.train_labels[index[:8]])
    assert torch.equal(normalise(torch.from_numpy(out[1]["x"][:8])), x)


def test_each_epoch_its_own_order_and_the_same_seed_the_same(data_dir):
    spec = MnistConfig(num_workers=1, cpus_per_worker=1)
    table, kind, source = descriptor_table(spec, data_dir, None, train_samples=5000)
    first, again = (run_epoch(table, kind, source, 1, epoch=0, per_rank_batch=128)[0]["id"] for _ in range(2))
    second = run_epoch(table, kind, source, 1, epoch=1, per_rank_batch=128)[0]["id"]
    assert first.tolist() == again.tolist() != second.tolist()
    assert len(set(first) ^ set(second)) < 2 * 128  # the same rows but for the few left over each epoch
    other_seed = descriptor_table(MnistConfig(seed=1), data_dir, None, train_samples=5000)[0]
    assert other_seed.column("id").to_pylist() != table.column("id").to_pylist()


@pytest.fixture()
def byo_catalog(tmp_path, monkeypatch):
    root = image_dir(tmp_path / "imgs", per_label=6)
    images = np.random.default_rng(3).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    png = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, format="PNG")
        png.append(buf.getvalue())
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"image": png[:30], "label": np.arange(30) % 10}), tmp_path / "shards" / "a.parquet",
                   row_group_size=7)
    pq.write_table(pa.table({"image": [i.reshape(-1).tolist() for i in images[30:]], "label": np.arange(20) % 10}),
                   tmp_path / "shards" / "b.parquet", row_group_size=8)
    write_catalog(tmp_path, {
        "imgs": {"kind": "images", "source": str(root), "description": "d", "test_fraction": 0.2},
        "shards": {"kind": "images", "source": str(tmp_path / "shards"), "format": "parquet", "description": "d",
                   "test_fraction": 0.2}}, monkeypatch)
    return tmp_path


@pytest.mark.parametrize("name,train_samples", [("imgs", None), ("imgs", 20), ("shards", None), ("shards", 25)])
def test_own_data_shards_are_the_memory_paths_training_split(byo_catalog, name, train_samples):
    data_dir = byo_catalog / "data"
    ds = load_catalog().get(name)
    fp = fingerprint(ds, data_dir)
    spec = MnistConfig(num_workers=2, cpus_per_worker=1, dataset=name)
    table, kind, source = descriptor_table(spec, data_dir, {"fingerprint": fp.as_dict()}, train_samples=train_samples)
    # The in-memory path: every row's key in order, the held-out ones dropped, the first N kept.
    keys = ingest._keys(ds.name, ds.source, byo.data_files(ds.name, ds.source))
    every_train = [k for k, held in zip(keys, byo.held_out(keys, ds.test_fraction)) if not held]
    split = set(every_train[:train_samples])
    assert len(every_train) == fp.train_rows
    out = run_epoch(table, kind, source, 2, epoch=0, per_rank_batch=4)
    check(out, split, 4)
    # Decoded alike: each row the shards hand out is the materialised array's row of that key.
    arrays = ingest.load_images(data_dir, {"arrays": str(ingest.materialise_images(ds, fp, data_dir))})
    position = {k: i for i, k in enumerate(every_train)}  # the memory path takes the first N of these
    for o in out:
        for j, key in enumerate(o["id"][:6]):
            assert np.array_equal(o["x"][j], arrays.train_images[position[key]])
            assert o["y"][j] == int(arrays.train_labels[position[key]])
