"""The Ray Data path's sharding, without Ray: the descriptors and the decode stage are plain functions.
Every rank's rows are disjoint, together they are exactly the in-memory path's training split, and
they decode to the same normalised pixels. (tests/integration/test_datasets.py runs them on Ray Data.)"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.unit.test_datasets import image_dir, write_catalog
from trainers import byo, ingest
from trainers.dataset_catalog import load_catalog
from trainers.fingerprint import fingerprint
from trainers.mnist_model import to_tensors
from trainers.ray_pipeline import _decode_fragments, _decode_rows, _expanded_ranks, descriptor_table
from trainers.specs import MnistConfig


def shards(table, kind, source, world):
    decode = _decode_fragments if kind == "fragments" else _decode_rows
    return [decode(table, rank=r, kind=kind, source=source, ids=True) for r in range(world)]


def check_disjoint_and_cover(out: list[dict], expected_ids: set[str]):
    ids = [list(o["id"]) for o in out]
    assert all(len(i) == len(set(i)) for i in ids)
    assert sum(len(i) for i in ids) == len(expected_ids) and set().union(*map(set, ids)) == expected_ids
    assert all(len(i) > 0 for i in ids)  # a hash, not a deal: but every rank gets rows


def test_builtin_shards_cover_the_first_n_images_once(data_dir):
    spec = MnistConfig(num_workers=3, cpus_per_worker=1, batch_size=30)
    table, kind, source = descriptor_table(spec, data_dir, None, train_samples=600)
    out = shards(table, kind, source, 3)
    check_disjoint_and_cover(out, {f"train#{i}" for i in range(600)})
    assert np.bincount(_expanded_ranks(table, kind), minlength=3).tolist() == [len(o["y"]) for o in out]
    # The pixels and labels are the in-memory path's, normalised the same way.
    a = ingest.load_images(data_dir, None)
    x, y = to_tensors(a.train_images[:600], a.train_labels[:600])
    index = [int(k.split("#")[1]) for k in out[1]["id"]]
    assert np.allclose(out[1]["x"], x[index].numpy(), atol=1e-6) and out[1]["y"].tolist() == y[index].tolist()


def test_same_seed_same_order_another_seed_another(data_dir):
    def order(seed):
        return descriptor_table(MnistConfig(seed=seed), data_dir, None, train_samples=300)[0].column("id").to_pylist()

    assert order(1) == order(1) != order(2)


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
    info = {"fingerprint": fp.as_dict()}
    table, kind, source = descriptor_table(MnistConfig(num_workers=2, cpus_per_worker=1, dataset=name), data_dir, info,
                                           train_samples=train_samples)
    out = shards(table, kind, source, 2)
    # The in-memory path: every row's key in order, the held-out ones dropped, the first N kept.
    keys = ingest._keys(ds.name, ds.source, byo.data_files(ds.name, ds.source))
    every_train = [k for k, held in zip(keys, byo.held_out(keys, ds.test_fraction)) if not held]
    train = every_train[:train_samples]
    check_disjoint_and_cover(out, set(train))
    assert len(train) == fp.train_rows if train_samples is None else train_samples
    assert np.bincount(_expanded_ranks(table, kind), minlength=2).tolist() == [len(o["y"]) for o in out]
    # Decoded alike: the rows the materialised arrays hold, in the same order, are the shards' rows.
    arrays = ingest.load_images(data_dir, {"arrays": str(ingest.materialise_images(ds, fp, data_dir))})
    position = {k: i for i, k in enumerate(every_train)}  # the memory path takes the first N of these
    for o in out:
        for j, key in enumerate(o["id"][:5]):
            expected = to_tensors(arrays.train_images[position[key]:position[key] + 1],
                                  arrays.train_labels[position[key]:position[key] + 1])
            assert np.allclose(o["x"][j], expected[0][0].numpy(), atol=1e-6) and o["y"][j] == int(expected[1][0])
