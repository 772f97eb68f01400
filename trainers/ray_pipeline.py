"""Ray Data ingest for the MNIST trainer: `--data-pipeline ray-data`.

The in-memory path (the default) gives every worker the decoded training set. This one streams it:
the training images are read, decoded to 28x28 grayscale and normalised by Ray Data tasks while the
workers train, so a set larger than a worker's memory trains in bounded memory. The step code is
the same (`trainers.mnist_model.train_batches`); the held-out split stays in memory (it is small).

- Descriptors. The driver builds a small dataset with one row per training image (a built-in's
  pixels, or an image file's path and label) or one row per Parquet row group; only these are held,
  the image bytes are read by the tasks that decode them.
- Shards. A row's worker is a hash of its identity (`byo.rank_of`); `RankShards`, a Ray Train
  `DataConfig`, gives each rank its own pipeline: keep its rows -> read and decode -> normalise. So
  the shards are disjoint, cover the training split, and are the same on every run (Ray's default
  `streaming_split` hands blocks to whichever worker asks first). Each rank reads every Parquet row
  group but decodes only its rows.
- Order. The descriptors are in one seeded permutation, execution preserves order, and each epoch
  shuffles through a seeded local buffer (`local_shuffle_seed`): the same seed gives the same
  batches, and a run resumed mid-epoch replays that epoch's first batches and skips them (exact; it
  costs their decoding). The shuffle is within the buffer, not the memory path's full permutation.
- Steps. The ranks' row counts differ a little (a hash, not a deal); every rank takes the steps of
  the smallest shard, ceil(min rows / batch), so DDP's all-reduce stays in step.
- Resources. The decode stage's tasks reserve `$OPPEN_DECODE_CPUS` CPUs each (default 0: they share
  the gang's cores, the only choice on a node the gang fills), at most `$OPPEN_DECODE_TASKS` (2) at
  once per rank (`decode_resources`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers import byo
from trainers.data import DataError
from trainers.dataset_catalog import Source, load_catalog
from trainers.mnist_model import MNIST_MEAN, MNIST_STD

# Descriptor rows per block, the unit one decode task takes: a built-in's pixels, image files
# (~0.1-5 ms each to read and decode), Parquet row groups.
BLOCK_ROWS = {"pixels": 2048, "files": 128, "fragments": 4}
SHUFFLE_BUFFER = 4096      # rows mixed per epoch by the local shuffle


@dataclass
class Plan:
    """What the driver hands Ray Train: the descriptor dataset, the DataConfig that shards it, and
    each rank's row count (the steps per epoch follow from the smallest)."""

    dataset: Any
    data_config: Any
    rows_per_rank: list[int]

    def steps_per_epoch(self, per_rank_batch: int) -> int:
        return -(-min(self.rows_per_rank) // per_rank_batch)


# --------------------------------------------------------------------------- driver


def mnist_plan(spec, data_dir: Path, info: dict | None, *, train_samples: int | None = None,
               ids: bool = False) -> Plan:
    """The descriptor dataset of the spec's training split, sharded over `spec.num_workers` ranks.
    `ids`: the batches also carry each row's identity (`id`, text), for tests."""
    import ray.data

    table, kind, source = descriptor_table(spec, data_dir, info, train_samples=train_samples)
    counts = np.bincount(_expanded_ranks(table, kind), minlength=spec.num_workers).tolist()
    if min(counts) < 1:
        raise DataError(f"{sum(counts)} training rows cannot feed {spec.num_workers} workers: a worker would get "
                        "none. To fix: fewer --num-workers, or more data.", field="params.dataset")
    step = BLOCK_ROWS[kind]
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    build = functools.partial(_rank_pipeline, kind=kind, source=source, ids=ids)
    return Plan(ray.data.from_arrow(blocks), RankShards(build), counts)


def descriptor_table(spec, data_dir: Path, info: dict | None, *, train_samples: int | None = None):
    """(descriptors in the seed's order, their kind, the source they read): no Ray needed."""
    import pyarrow as pa

    world = spec.num_workers
    fp = info["fingerprint"] if info else None
    if fp is None or fp["format"] == "builtin":
        from trainers.data import load_mnist

        arrays = load_mnist(data_dir)
        n = min(train_samples or len(arrays.train_labels), len(arrays.train_labels))
        keys = [f"train#{i}" for i in range(n)]
        images = np.ascontiguousarray(arrays.train_images[:n]).reshape(n, -1)
        table = pa.table({"id": keys, "rank": byo.rank_of(keys, world),
                          "pixels": pa.FixedSizeBinaryArray.from_buffers(pa.binary(784), n,
                                                                         [None, pa.py_buffer(images.tobytes())]),
                          "label": arrays.train_labels[:n].astype(np.int64)})
        kind, source = "pixels", None
    else:
        ds = load_catalog().get(fp["name"], "images")
        table, kind = _descriptors(ds, world, train_samples)
        source = ds.source
    order = np.random.default_rng(spec.seed).permutation(table.num_rows)  # blocks mix labels and files
    return table.take(pa.array(order)), kind, source


def _descriptors(ds, world: int, train_samples: int | None):
    """(descriptor table, kind) for a dataset of one's own: `files` rows (image folders: path, label,
    rank) or `fragments` rows (Parquet: file, row group, first row, and the split rules)."""
    import pyarrow as pa

    source, test_source = ds.source, ds.test_source
    files = byo.data_files(ds.name, source)
    if source.format == "image-dir":
        keys = [byo.row_key(f.rel) for f in files]
        train = np.ones(len(keys), bool) if test_source else ~byo.held_out(keys, ds.test_fraction)
        picked = [i for i in np.flatnonzero(train)][:train_samples or None]
        return pa.table({"id": [keys[i] for i in picked], "rank": byo.rank_of([keys[i] for i in picked], world),
                         "path": [files[i].path for i in picked],
                         "label": [byo.image_dir_label(ds.name, files[i]) for i in picked]}), "files"
    # Parquet: one descriptor per row group; the rows' split and rank are decided where they are read.
    rows, groups = [], []
    for fi, f in enumerate(files):
        meta = byo.parquet_file(ds.name, source, f).metadata
        first = 1
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            groups.append((fi, f.path, f.rel, f.shown, g, first, n))
            first += n
        rows += [byo.row_key(f.rel, i) for i in range(1, first)]
    fraction = 0.0 if test_source else ds.test_fraction
    test = np.zeros(len(rows), bool) if test_source else byo.held_out(rows, fraction)
    plain = byo.split_hash(rows) < fraction
    forced = [rows[i] for i in np.flatnonzero(test != plain)]  # the one-each-side rule of held_out
    train_idx = np.flatnonzero(~test)[:train_samples or None]
    cutoff = len(rows) if train_samples is None or not len(train_idx) else int(train_idx[-1]) + 1  # rows past it: unused
    fi, paths, rels, shown, group, first, count = zip(*groups)
    starts = np.cumsum([0, *count[:-1]])  # each group's first row in the whole dataset's order
    return pa.table({"file": list(fi), "path": list(paths), "rel": list(rels), "shown": list(shown),
                     "group": list(group), "first": list(first), "start": starts.tolist(),
                     "rows": list(count), "world": [world] * len(groups), "fraction": [fraction] * len(groups),
                     "forced": [forced] * len(groups), "cutoff": [cutoff] * len(groups),
                     "dataset": [ds.name] * len(groups)}), "fragments"


def _expanded_ranks(table, kind: str) -> np.ndarray:
    """The rank of every training row the descriptors stand for (Parquet: decided from the keys)."""
    if kind != "fragments":
        return np.asarray(table.column("rank").to_numpy())
    out = []
    for row in table.to_pylist():
        keys = [byo.row_key(row["rel"], row["first"] + i) for i in range(row["rows"])]
        keep = _train_rows(keys, row)
        out.append(byo.rank_of([k for k, m in zip(keys, keep) if m], row["world"]))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _train_rows(keys: list[str], d: dict) -> np.ndarray:
    """Which of a row group's rows are training rows (same rule as byo.held_out, and the cutoff)."""
    test = byo.split_hash(keys) < d["fraction"]
    for i, k in enumerate(keys):
        if k in d["forced"]:
            test[i] = not test[i]
    position = d["start"] + np.arange(len(keys))
    return ~test & (position < d["cutoff"])


# --------------------------------------------------------------------------- sharding


def _make_data_config():
    import ray.train
    from ray.data import ExecutionOptions

    class _RankShards(ray.train.DataConfig):
        """Each rank its own pipeline over the rows that hash to it (see the module docstring)."""

        def __init__(self, build):
            super().__init__(execution_options=ExecutionOptions(preserve_order=True))
            self._build = build

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                for rank in range(world_size):
                    shard = self._build(ds, rank)
                    shard.context.execution_options = self._resolve_execution_options(name)
                    out[rank][name] = shard.iterator()
            return out

    return _RankShards


def RankShards(build):  # noqa: N802 - reads as the class it returns; Ray imported only when used
    return _make_data_config()(build)


def decode_resources() -> tuple[float, int]:
    """(CPUs each decode task reserves, tasks at once per rank): $OPPEN_DECODE_CPUS (default 0: the
    gang's cores) and $OPPEN_DECODE_TASKS (default 2), read when a pipeline is built."""
    return float(os.environ.get("OPPEN_DECODE_CPUS", "0")), int(os.environ.get("OPPEN_DECODE_TASKS", "2"))


def _rank_pipeline(ds, rank: int, *, kind: str, source: Source | None, ids: bool = False):
    """Rank `rank`'s stage: keep its rows, read and decode them, normalise (one Ray Data map stage)."""
    from ray.data import TaskPoolStrategy

    cpus, tasks = decode_resources()
    fn = _decode_fragments if kind == "fragments" else _decode_rows
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"rank": rank, "kind": kind, "source": source, "ids": ids},
                          num_cpus=cpus, compute=TaskPoolStrategy(size=tasks))


# --------------------------------------------------------------------------- decode (Ray Data tasks)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28], as trainers.mnist_model.to_tensors does."""
    return ((images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None, :, :]


def _decode_rows(batch, *, rank: int, kind: str, source: Source | None, ids: bool) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc

    mine = batch.filter(pc.equal(batch.column("rank"), rank))
    n = mine.num_rows
    labels = np.asarray(mine.column("label").to_numpy(), dtype=np.int64)
    if kind == "pixels":
        pixels = mine.column("pixels").combine_chunks()
        images = np.frombuffer(pixels.buffers()[1], np.uint8, count=n * 784,
                               offset=pixels.offset * 784).reshape(n, 28, 28)
    else:
        fs, _ = byo.filesystem(source)
        images = np.empty((n, 28, 28), np.uint8)
        for i, path in enumerate(mine.column("path").to_pylist()):
            with fs.open_input_stream(path) as stream:
                images[i] = byo.decode_image(stream.read())
    return {"x": normalise(images), "y": labels, **({"id": np.asarray(mine.column("id").to_pylist())} if ids else {})}


def _decode_fragments(batch, *, rank: int, kind: str, source: Source | None, ids: bool) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    fs, _ = byo.filesystem(source)
    xs, ys, names = [], [], []
    for d in batch.to_pylist():
        pf = pq.ParquetFile(fs.open_input_file(d["path"]))
        table = pf.read_row_group(d["group"], columns=["image", "label"])
        keys = [byo.row_key(d["rel"], d["first"] + i) for i in range(table.num_rows)]
        keep = _train_rows(keys, d)
        ranks = byo.rank_of(keys, d["world"])
        pick = np.flatnonzero(keep & (ranks == rank))
        if len(pick):
            sub = table.take(pick)
            images, labels = byo.decode_parquet_rows(d["dataset"], d["shown"], d["first"], sub.column("image"),
                                                     sub.column("label"))
            xs.append(normalise(images))
            ys.append(labels)
            names += [keys[i] for i in pick]
    out = {"x": np.concatenate(xs) if xs else np.zeros((0, 1, 28, 28), np.float32),
           "y": np.concatenate(ys) if ys else np.zeros(0, np.int64)}
    return {**out, **({"id": np.asarray(names, dtype=object)} if ids else {})}


# --------------------------------------------------------------------------- workers


def epoch_batches(shard, *, epoch: int, seed: int, batch_size: int, start: int, steps: int):
    """(images, labels) tensors of one epoch of this rank's shard: steps `start`..`steps`, in the order the
    seed fixes (the first `start` batches are read and dropped, so a resumed epoch goes on exactly)."""
    import itertools

    import torch

    batches = shard.iter_torch_batches(batch_size=batch_size, dtypes={"x": torch.float32, "y": torch.int64},
                                       local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                       local_shuffle_seed=seed * 1_000_003 + epoch, prefetch_batches=2)
    pairs = ((b["x"], b["y"]) for b in batches)
    try:
        yield from itertools.islice(pairs, start, steps)
    finally:  # an epoch cut short (equal steps, a drain) stops its execution now, not at garbage collection
        pairs.close()
        if hasattr(batches, "close"):
            batches.close()
