"""Ray Data ingest for the MNIST trainer: `--data-pipeline ray-data`.

The in-memory path (the default) gives every worker the decoded training set. This one streams it:
the training images are read and decoded to 28x28 grayscale by Ray Data while the
workers train, so a set larger than a worker's memory trains in bounded memory. The step code is
the same (`trainers.mnist_model.train_batches`); the held-out split stays in memory (it is small).

- Descriptors. The driver cuts the training split into blocks of descriptors, one row per image (a
  built-in's pixels, or an image file's path and label) or per Parquet row group, and puts each
  block in the object store once; the image bytes are read by what decodes them.
- One execution per run. The dataset handed to Ray Train is a schedule: one row per (epoch, block),
  every epoch's blocks in an order of its own (seeded by seed and epoch). Each rank's pipeline is one
  map stage over it, run by one long-lived decoder actor (`_RankDecoder`): fetch the block, keep this
  rank's rows, shuffle them (seeded by seed, epoch and block), read and decode (to uint8: the worker
  normalises a batch as it arrives, a quarter of float32's bytes through the object store). A fresh
  execution per epoch would restart its workers every epoch (Ray kills idle task workers beyond its
  soft limit within a second; on 2 cores that churn cost a tenth of the training time).
- Shards. A row's worker is a hash of its identity (`byo.rank_of`); `RankShards`, a Ray Train
  `DataConfig`, gives each rank its own pipeline, so the shards are disjoint, together cover the
  training split, and are the same on every run (Ray's default `streaming_split` hands blocks to
  whichever worker asks first). Each rank reads every Parquet row group but decodes only its rows.
- Steps. The ranks' row counts differ a little (a hash, not a deal): every rank takes floor(the
  smallest shard / batch) full batches an epoch, and the schedule says how many of each block's rows
  to keep so that each epoch is exactly that (the rows past it, a different few each epoch, wait for
  the next). DDP's all-reduce stays in step and no batch straddles two epochs.
- Order and resuming. The same seed gives the same batches. A run resumed at (epoch, step) starts
  its schedule at that epoch when the driver knows it (`--resume`: the last checkpoint's epoch) and
  skips the batches before the step; a worker group restarted mid-run starts where the driver's
  schedule starts and skips the batches it already trained. Either way it goes on exactly, paying
  for reading the skipped batches. The shuffle is per block, not the memory path's full permutation.
- Resources. One decoder actor per rank, placed by `stage_options`: `$OPPEN_DECODE_CPUS` CPUs
  (default 0: it shares the gang's cores) and, on a cluster with a CPU worker group, that group's
  nodes only. The LLM trainer's token blocks (trainers.text_pipeline) go through the same schedule.
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
from trainers.mnist_model import normalise
from trainers.runtime import NODE_GROUP_LABEL, PREPROCESS_GROUP_ENV

# Descriptor rows per block, the unit the decoder takes at once: a built-in's pixels, image files
# (~0.1-5 ms each to read and decode), Parquet row groups.
BLOCK_ROWS = {"pixels": 2048, "files": 128, "fragments": 4}


@dataclass
class Plan:
    """What the driver hands Ray Train: the schedule dataset, the DataConfig that turns it into each
    rank's pipeline, and the shape of an epoch."""

    dataset: Any
    data_config: Any
    rows_per_rank: list[int]     # training rows of each rank's shard
    steps_per_epoch: int         # full batches per epoch, the same on every rank
    first_epoch: int             # the schedule's first epoch

    def stream(self) -> dict:
        """What train_func needs to read the schedule: the loop config's `stream`."""
        return {"rows_per_rank": self.rows_per_rank, "steps_per_epoch": self.steps_per_epoch,
                "first_epoch": self.first_epoch}


# --------------------------------------------------------------------------- driver


def mnist_plan(spec, data_dir: Path, info: dict | None, *, train_samples: int | None = None,
               first_epoch: int = 0, ids: bool = False) -> Plan:
    """The schedule of the spec's training split over epochs first_epoch..epochs-1, sharded over
    `spec.num_workers` ranks. `ids`: the batches also carry each row's identity (`id`), for tests."""
    import ray

    world, per_rank_batch = spec.num_workers, spec.batch_size // spec.num_workers
    first_epoch = min(first_epoch, spec.epochs - 1)  # a finished run resumed for no more epochs reads none
    table, kind, source = descriptor_table(spec, data_dir, info, train_samples=train_samples)
    step = BLOCK_ROWS[kind]
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    counts = np.stack([np.bincount(_expanded_ranks(b, kind), minlength=world) for b in blocks])  # [block, rank]
    totals = counts.sum(axis=0)
    if int(totals.min()) < per_rank_batch:
        raise DataError(f"{int(totals.sum())} training rows over {world} worker(s) ({', '.join(map(str, totals))}) "
                        f"cannot fill one batch of {per_rank_batch} each. To fix: fewer --num-workers, a smaller "
                        "--batch-size, or more data.", field="params.dataset")
    build = functools.partial(rank_pipeline, kind=kind, source=source, seed=spec.seed, ids=ids)
    return schedule_plan([ray.put(b) for b in blocks], counts, build, seed=spec.seed, epochs=spec.epochs,
                         first_epoch=first_epoch, rows_per_step=per_rank_batch)


def schedule_plan(refs: list, counts: np.ndarray, build, *, seed: int, epochs: int, first_epoch: int,
                  rows_per_step: int) -> Plan:
    """The (epoch, block) schedule over blocks already in the object store (`counts`: [block, rank] rows),
    each epoch exactly `steps * rows_per_step` rows a rank; `build(ds, rank, refs=...)` makes a rank's stage."""
    import pyarrow as pa
    import ray

    totals = counts.sum(axis=0)
    steps = int(totals.min()) // rows_per_step
    rows = []
    for epoch in range(first_epoch, epochs):
        left = np.full(counts.shape[1], steps * rows_per_step)
        for block in epoch_order(seed, epoch, len(refs)):
            keep = np.minimum(counts[block], left)
            left -= keep
            rows.append({"epoch": epoch, "block": int(block), "keep": keep.tolist()})
    schedule = pa.Table.from_pylist(rows)
    return Plan(ray.data.from_arrow([schedule.slice(i, 1) for i in range(schedule.num_rows)]),
                RankShards(functools.partial(build, refs=refs)), totals.tolist(), steps, first_epoch)


def epoch_order(seed: int, epoch: int, blocks: int) -> np.ndarray:
    """The order an epoch reads the blocks in."""
    return np.random.default_rng([seed, epoch, 1]).permutation(blocks)


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


def stage_options() -> dict:
    """Where a preprocessing stage's actors run, read when a pipeline is built: `$OPPEN_DECODE_CPUS`
    CPUs each (default 0: the gang's cores, the only choice on a node the gang fills) and, where the
    platform names a CPU worker group (`$OPPEN_PREPROCESS_GROUP`, set in every job's environment on a
    cluster with one), only that group's nodes, so that GPU nodes train while CPU nodes preprocess."""
    options: dict = {"num_cpus": float(os.environ.get("OPPEN_DECODE_CPUS", "0"))}
    group = os.environ.get(PREPROCESS_GROUP_ENV)
    if group:
        options["label_selector"] = {NODE_GROUP_LABEL: group}
    return options


def say_where(stage: str) -> None:
    """A stage's actor says which node group it landed on: the job's log shows where preprocessing ran."""
    import ray

    from trainers.driver import PROGRESS

    group = ray.get_runtime_context().get_node_labels().get(NODE_GROUP_LABEL, "head")
    print(f"{PROGRESS} {stage} on node group {group}", flush=True)


def rank_pipeline(ds, rank: int, *, refs: list, kind: str, source: Source | None, seed: int,
                  ids: bool = False):
    """Rank `rank`'s stage over the schedule: one decoder actor, one (epoch, block) at a time."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(_RankDecoder, batch_format="pyarrow", batch_size=1,
                          fn_constructor_kwargs={"refs": refs, "rank": rank, "kind": kind, "source": source,
                                                 "seed": seed, "ids": ids},
                          compute=ActorPoolStrategy(size=1), **stage_options())


# --------------------------------------------------------------------------- decode (the rank's actor)


class _RankDecoder:
    """One rank's decoder: for each scheduled (epoch, block), the rank's rows of the block, shuffled,
    the first `keep[rank]` of them read and decoded to uint8 28x28 (EpochStream normalises them).
    `blocks`: the descriptor blocks themselves instead of object refs (tests, without Ray)."""

    def __init__(self, refs: list | None = None, *, rank: int, kind: str, source: Source | None, seed: int,
                 ids: bool = False, blocks: list | None = None):
        self.refs, self.blocks, self.rank, self.kind, self.source, self.seed, self.ids = (
            refs, blocks, rank, kind, source, seed, ids)
        if blocks is None:
            say_where(f"rank {rank}'s {kind} reader")

    def __call__(self, batch) -> dict[str, np.ndarray]:
        out = [self.decode(row["epoch"], row["block"], row["keep"][self.rank]) for row in batch.to_pylist()]
        return {key: np.concatenate([o[key] for o in out]) for key in out[0]}

    def descriptors(self, block: int):
        if self.blocks is not None:
            return self.blocks[block]
        import ray

        return ray.get(self.refs[block])

    def decode(self, epoch: int, block: int, keep: int) -> dict[str, np.ndarray]:
        table = self.descriptors(block)
        rng = np.random.default_rng([self.seed, epoch, 2, block])
        if self.kind == "tokens":  # blocks of token ids (trainers.text_pipeline): nothing to decode
            mine = self._mine(table, rng, keep)
            ids = mine.column("ids").combine_chunks()
            # int32 through the object store (GPT-2's ids fit): half of int64's bytes; widened on arrival.
            x = ids.flatten().to_numpy().astype(np.int32).reshape(mine.num_rows, ids.type.list_size)
            return {"x": x, **({"id": np.asarray(mine.column("id").to_pylist(), dtype=object)} if self.ids else {})}
        if self.kind == "fragments":
            images, labels, keys = self._fragments(table, rng, keep)
        else:
            mine = self._mine(table, rng, keep)
            labels = np.asarray(mine.column("label").to_numpy(), dtype=np.int64)
            keys = mine.column("id").to_pylist() if self.ids else []
            images = self._pixels(mine) if self.kind == "pixels" else self._files(mine)
        return {"x": images, "y": labels, **({"id": np.asarray(keys, dtype=object)} if self.ids else {})}

    def _mine(self, table, rng, keep: int):
        """This rank's rows of a block, shuffled, the first `keep`."""
        import pyarrow as pa
        import pyarrow.compute as pc

        mine = table.filter(pc.equal(table.column("rank"), self.rank))
        return mine.take(pa.array(rng.permutation(mine.num_rows)[:keep], pa.int64()))

    @staticmethod
    def _pixels(mine) -> np.ndarray:
        n = mine.num_rows
        pixels = mine.column("pixels").combine_chunks()
        return np.frombuffer(pixels.buffers()[1], np.uint8, count=n * 784,
                             offset=pixels.offset * 784).reshape(n, 28, 28)

    def _files(self, mine) -> np.ndarray:
        fs, _ = byo.filesystem(self.source)
        images = np.empty((mine.num_rows, 28, 28), np.uint8)
        for i, path in enumerate(mine.column("path").to_pylist()):
            with fs.open_input_stream(path) as stream:
                images[i] = byo.decode_image(stream.read())
        return images

    def _fragments(self, table, rng, keep: int):
        """This rank's training rows of the block's row groups, shuffled, the first `keep` decoded."""
        import pyarrow.parquet as pq

        fs, _ = byo.filesystem(self.source)
        picked = []  # (descriptor, row index in its group)
        for d in table.to_pylist():
            keys = [byo.row_key(d["rel"], d["first"] + i) for i in range(d["rows"])]
            mask = _train_rows(keys, d) & (byo.rank_of(keys, d["world"]) == self.rank)
            picked += [(d, int(i), keys[i]) for i in np.flatnonzero(mask)]
        chosen = [picked[i] for i in rng.permutation(len(picked))[:keep]]
        images, labels = np.empty((len(chosen), 28, 28), np.uint8), np.empty(len(chosen), np.int64)
        groups: dict[tuple, list[int]] = {}
        for j, (d, i, _) in enumerate(chosen):
            groups.setdefault((d["path"], d["group"], d["first"], d["shown"], d["dataset"]), []).append(j)
        for (path, group, first, shown, name), js in groups.items():
            table = pq.ParquetFile(fs.open_input_file(path)).read_row_group(group, columns=["image", "label"])
            rows = [chosen[j][1] for j in js]
            sub = table.take(rows)
            imgs, labs = byo.decode_parquet_rows(name, shown, first, sub.column("image"), sub.column("label"))
            images[js], labels[js] = imgs, labs
        return images, labels, [key for _, _, key in chosen]


# --------------------------------------------------------------------------- workers


class EpochStream:
    """A rank's batches over the whole run, epoch by epoch: `epoch(e, start)` yields epoch e's batches
    from batch `start` on (skipping what lies before, exactly), as (images, labels) tensors, or as
    token blocks (int64 [batch, block_size], travelling as int32) where `tokens`.

    Ray Data hands over `READ_BATCHES` batches at a time, sliced here: its cost per batch handed
    over (fetch, convert, move, a thread hand-off) is then paid once for several steps. Every epoch
    is a whole number of batches, so a slice never straddles two reads."""

    READ_BATCHES = 8

    def __init__(self, shard, *, batch_size: int, steps: int, first_epoch: int, tokens: bool = False,
                 device=None):
        import torch

        self.steps, self.first_epoch, self.done, self.tokens = steps, first_epoch, 0, tokens
        self.batch_size = batch_size
        # Images travel as uint8 (a quarter of float32's bytes) and are normalised where they arrive.
        dtypes = {"x": torch.int32} if tokens else {"x": torch.uint8, "y": torch.int64}
        # `device`: where the batches go (default: the CPU; Ray's own choice would be a logical GPU's).
        self._batches = shard.iter_torch_batches(batch_size=batch_size * self.READ_BATCHES, prefetch_batches=1,
                                                 dtypes=dtypes, device=device or "cpu")
        self._it = iter(self._batches)
        self._read: tuple = ()   # the last read, normalised: its tensors
        self._at = 0             # the next batch's first row in it

    def _next(self):
        if not self._read or self._at >= len(self._read[0]):
            got = next(self._it)
            self._read = (got["x"].long(),) if self.tokens else (normalise(got["x"]), got["y"])
            self._at = 0
        out = tuple(t[self._at:self._at + self.batch_size] for t in self._read)
        self._at += self.batch_size
        self.done += 1
        return out[0] if self.tokens else out

    def epoch(self, epoch: int, *, start: int = 0):
        target = (epoch - self.first_epoch) * self.steps + start
        if target < self.done:
            raise ValueError(f"epoch {epoch} step {start} is behind the stream (batch {self.done})")
        while self.done < target:  # resumed: read and drop what was trained already
            self._next()
        while self.done < (epoch - self.first_epoch + 1) * self.steps:
            yield self._next()

    def close(self) -> None:
        """Stop the execution now (a run drained or cut short), not at garbage collection."""
        for it in (self._it, self._batches):
            if hasattr(it, "close"):
                it.close()
