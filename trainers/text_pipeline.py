"""Ray Data ingest for the LLM trainer: `--data-pipeline ray-data`.

The in-memory path (the default) tokenizes the corpus in the driver, caches the ids in the data dir
and gives every worker all of them. This one tokenizes with Ray Data and streams the blocks:

- Tokenize. The text is cut at paragraph breaks into the same pieces the in-memory path tokenizes
  (`text_data.text_chunks`); a Ray Data `map_batches` stage of tokenizer actors encodes them, placed
  like every preprocessing stage (`ray_pipeline.stage_options`: a cluster's CPU worker group). The
  driver reads the ids back in order and cuts them into blocks of `block_size` tokens: the very
  blocks the in-memory path trains on (a test holds the two equal), `--max-train-tokens` included
  (the stage stops once the driver has that many).
- Store. Blocks go to the object store in groups of `GROUP_BLOCKS` as they are cut, each row with
  its rank (a hash of the block's index, `byo.rank_of`); the driver keeps only the per-rank counts,
  so its memory is one group's whatever the corpus. Ray spills the object store to disk past its size.
- Train. The groups are scheduled per (epoch, group) and read by one actor per rank, exactly as
  MNIST's images are (`ray_pipeline.schedule_plan`): disjoint shards, the same order for the same
  seed, equal steps on every rank, exact resumption by skipping the steps done. The step code is
  the in-memory path's (`llm_model.train_step` on [per-rank batch, block_size] tensors).
- Held out. The validation text is tokenized by the same stage and its ids, a tenth of the corpus
  or less, travel to the workers as one object.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers import byo
from trainers.data import DataError
from trainers.ray_pipeline import Plan, rank_pipeline, say_where, schedule_plan, stage_options
from trainers.text_data import text_chunks

GROUP_BLOCKS = 256  # token blocks per object-store group: the unit a rank's actor fetches and shuffles


@dataclass
class TextPlan:
    """The training schedule, the held-out ids (an object ref) and what the driver checks and logs."""

    plan: Plan
    validation: Any          # ray.ObjectRef of int32 ids
    train_tokens: int        # tokens in the training blocks
    validation_tokens: int


class _Tokenize:
    """A Ray Data actor: the GPT-2 tokenizer, loaded once, encoding one piece of text per row."""

    def __init__(self, data_dir: str, offline: bool):
        from trainers.tokenizer import load_gpt2_tokenizer

        self.tokenizer, _ = load_gpt2_tokenizer(Path(data_dir), offline=offline)
        say_where("tokenizer")

    def __call__(self, batch):
        import pyarrow as pa

        ids = [np.asarray(self.tokenizer(text, verbose=False)["input_ids"], dtype=np.int32)
               for text in batch.column("text").to_pylist()]
        return pa.table({"piece": batch.column("piece"), "split": batch.column("split"),
                         "ids": pa.array(ids, type=pa.list_(pa.int32()))})


def tokenized_pieces(train: str, validation: str, *, data_dir: Path,
                     offline: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(split, ids) of every piece of both texts, each text's in order (the validation text's first,
    so a reader that has training tokens enough can stop), tokenized by a Ray Data stage."""
    import pyarrow as pa
    import ray.data
    from ray.data import ActorPoolStrategy

    pieces = [("validation", t) for t in text_chunks(validation)] + [("train", t) for t in text_chunks(train)]
    table = pa.table({"piece": list(range(len(pieces))), "split": [s for s, _ in pieces],
                      "text": [t for _, t in pieces]})
    ds = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
    ds = ds.map_batches(_Tokenize, batch_format="pyarrow", batch_size=1,
                        fn_constructor_kwargs={"data_dir": str(data_dir), "offline": offline},
                        compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(4, len(pieces)))),
                        **stage_options())
    ds.context.execution_options.preserve_order = True  # the ids in the text's order
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for split, ids in zip(batch.column("split").to_pylist(), batch.column("ids")):
            yield split, ids.values.to_numpy(zero_copy_only=False)


def text_plan(spec, train: str, validation: str, *, data_dir: Path, offline: bool,
              ids: bool = False) -> TextPlan:
    """Tokenize both texts with Ray Data, store the training blocks, schedule them over the spec's
    epochs (or enough epochs for `--max-steps`). `ids`: the batches also carry each block's index."""
    import ray

    world, block_size = spec.num_workers, spec.block_size
    per_rank = spec.batch_size // world
    limit = (spec.max_train_tokens // block_size) if spec.max_train_tokens else None
    refs, counts, held, pending = [], [], [], []
    carry, n_blocks, stored = np.zeros(0, np.int32), 0, 0

    def flush(final: bool) -> None:
        """Put full groups of the blocks cut so far (and, at the end, the rest) in the object store."""
        nonlocal pending, stored
        while pending and (final or sum(map(len, pending)) >= GROUP_BLOCKS):
            rows = np.concatenate(pending)
            group, rest = rows[:GROUP_BLOCKS], rows[GROUP_BLOCKS:]
            pending = [rest] if len(rest) else []
            ranks = byo.rank_of([f"block#{i}" for i in range(stored, stored + len(group))], world)
            refs.append(ray.put(_group_table(group, stored, ranks)))
            counts.append(np.bincount(ranks, minlength=world))
            stored += len(group)

    pieces = tokenized_pieces(train, validation, data_dir=data_dir, offline=offline)
    try:
        for split, piece in pieces:
            if split == "validation":
                held.append(piece)
                continue
            stream = np.concatenate([carry, piece])
            whole = len(stream) // block_size
            if limit is not None:
                whole = min(whole, limit - n_blocks)
            pending.append(stream[:whole * block_size].reshape(whole, block_size))
            carry = stream[whole * block_size:]
            n_blocks += whole
            flush(final=False)
            if limit is not None and n_blocks >= limit:
                break  # --max-train-tokens: the rest of the text is not tokenized
    finally:
        pieces.close()  # stops the Ray Data stage where the reading stopped
    flush(final=True)
    val = np.concatenate(held) if held else np.zeros(0, np.int32)
    rows_per_step = per_rank * spec.grad_accum
    counts_arr = np.stack(counts) if counts else np.zeros((0, world), np.int64)
    totals = counts_arr.sum(axis=0)
    if int(totals.min()) < rows_per_step:
        raise DataError(f"{n_blocks} training blocks of {block_size} tokens over {world} worker(s) cannot fill one "
                        f"step of {per_rank} x {spec.grad_accum} each. To fix: add text, or lower --block-size / "
                        "--batch-size / --grad-accum.", field="params.dataset")
    steps = int(totals.min()) // rows_per_step
    total = spec.max_steps or spec.epochs * steps
    build = functools.partial(rank_pipeline, kind="tokens", source=None, seed=spec.seed, ids=ids)
    plan = schedule_plan(refs, counts_arr, build, seed=spec.seed, epochs=math.ceil(total / steps), first_epoch=0,
                         rows_per_step=rows_per_step)
    return TextPlan(plan, ray.put(val), n_blocks * block_size, len(val))


def _group_table(blocks: np.ndarray, first: int, ranks: np.ndarray):
    """A group of token blocks as the rank actors read it: id, rank, ids (fixed-size lists)."""
    import pyarrow as pa

    n, size = blocks.shape
    flat = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
    return pa.table({"id": np.arange(first, first + n, dtype=np.int64), "rank": ranks,
                     "ids": pa.FixedSizeListArray.from_arrays(flat, size)})
