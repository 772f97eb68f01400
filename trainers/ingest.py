"""A run's dataset from its catalog name to the workers: checked in the driver, loaded in the workers.

`prepare(spec, data_dir)` runs in the driver before any worker exists (trainers/driver.py): it looks
the `--dataset` up in the catalog, takes its fingerprint (hash, rows, schema) and, for a dataset of
the user's own, reads and checks every row (trainers/byo.py) and writes the decoded result to the
data dir, keyed by the content hash: `datasets/byo/<name>-<hash>-all.npz` (images: both splits) or
`-test.npz` (images streamed by Ray Data: the held-out split only), `<name>-<hash>.json` (text: the
train and validation text). A second run on the same bytes finds them and decodes nothing; a bad
row fails the run here, with exit code 2 and the file and row.

What `prepare` returns travels to the workers in the loop config; `load_images` / `corpus_path` turn
it back into data there, and `mlflow_input` into the MLflow input record rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from trainers.data import DataError, MnistArrays, _file_lock, _load_npz, _save_npz, load_mnist
from trainers.dataset_catalog import Dataset, load_catalog
from trainers.fingerprint import Fingerprint, fingerprint


def dataset_kind(spec_cls: type) -> str | None:
    """The kind of dataset a trainer config takes (its `dataset` field's metadata), or None."""
    for f in dataclasses.fields(spec_cls):
        if f.name == "dataset":
            return f.metadata.get("dataset_kind")
    return None


def prepare(spec: Any, data_dir: Path) -> dict | None:
    """Resolve, fingerprint and check the spec's dataset (driver side). None for a trainer without one."""
    kind = dataset_kind(type(spec))
    if kind is None:
        return None
    ds = load_catalog().get(spec.dataset, kind)
    fp = fingerprint(ds, data_dir)
    info: dict[str, Any] = {"fingerprint": fp.as_dict(), "pipeline": getattr(spec, "data_pipeline", "memory")}
    if not ds.builtin:
        if kind == "images":
            info["arrays"] = str(materialise_images(ds, fp, data_dir,
                                                    keep_train=info["pipeline"] != "ray-data"))
        else:
            info["corpus"] = str(materialise_text(ds, fp, data_dir))
    return info


def describe(info: dict) -> str:
    fp = Fingerprint.from_dict(info["fingerprint"])
    return (f"dataset {fp.name}: {fp.rows:,} {fp.unit} ({fp.train_rows:,} train / {fp.test_rows:,} held out), "
            f"sha256 {fp.sha256[:12]}, from {fp.origin}")


# --------------------------------------------------------------------------- workers


def info_for(spec: Any, cfg: dict) -> dict | None:
    """The dataset info the driver prepared for this spec, or prepared here (a Tune trial whose search
    varies the dataset)."""
    info = cfg.get("dataset")
    if info and info["fingerprint"]["name"] == spec.dataset:
        return info
    return prepare(spec, Path(cfg["data_dir"]))


def load_images(data_dir: str | os.PathLike, info: dict | None) -> MnistArrays:
    """The images the driver prepared: the built-in MNIST, or the decoded arrays of a dataset of one's own."""
    if info is None or "arrays" not in info:
        return load_mnist(data_dir)
    return _load_npz(Path(info["arrays"]))


def corpus_path(info: dict | None) -> Path | None:
    """A text dataset of one's own: the JSON the driver wrote (None for a built-in corpus)."""
    return Path(info["corpus"]) if info and "corpus" in info else None


def mlflow_input(info: dict | None, **used: int) -> dict | None:
    """The `mlflow.entities.Dataset` fields rank 0 logs as the run's training input."""
    return Fingerprint.from_dict(info["fingerprint"]).mlflow_dataset(**used) if info else None


# --------------------------------------------------------------------------- materialising


def _byo_dir(data_dir: Path) -> Path:
    d = Path(data_dir) / "datasets" / "byo"
    d.mkdir(parents=True, exist_ok=True)
    return d


def materialise_images(ds: Dataset, fp: Fingerprint, data_dir: Path, *, keep_train: bool = True) -> Path:
    """Decode and check every image once; keep both splits (or only the held-out one) as uint8 arrays."""
    from trainers import byo

    base = _byo_dir(data_dir) / f"{ds.name}-{fp.sha256[:16]}"
    full, test_only = base.with_name(base.name + "-all.npz"), base.with_name(base.name + "-test.npz")
    with _file_lock(base.with_suffix(".lock")):
        if full.exists():
            return full
        if not keep_train and test_only.exists():
            return test_only
        parts: dict[str, list] = {"train": [], "test": []}
        for split, source in (("train", ds.source), ("test", ds.test_source)):
            if source is None:
                continue
            files = byo.data_files(ds.name, source)
            mask = None
            if ds.test_source is None:
                mask = byo.held_out(_keys(ds.name, source, files), ds.test_fraction)
            at = 0
            for batch in byo.iter_image_batches(ds.name, source, files):
                n = len(batch.labels)
                if mask is None:
                    target = np.full(n, split == "test")
                else:
                    target = mask[at:at + n]
                at += n
                for name, pick in (("train", ~target), ("test", target)):
                    if name == "train" and not keep_train:
                        continue
                    if pick.any():
                        parts[name].append((batch.images[pick], batch.labels[pick]))
        arrays = {split: (np.concatenate([p[0] for p in got]) if got else np.zeros((0, 28, 28), np.uint8),
                          np.concatenate([p[1] for p in got]) if got else np.zeros(0, np.int64))
                  for split, got in parts.items()}
        if len(arrays["test"][1]) == 0 or (keep_train and len(arrays["train"][1]) == 0):
            raise DataError(f"dataset {ds.name}: {fp.rows} image(s) cannot make both a training and a held-out "
                            "split. To fix: add images (or a test_source).", field="params.dataset")
        out = full if keep_train else test_only
        _save_npz(out, MnistArrays(arrays["train"][0], arrays["train"][1], arrays["test"][0], arrays["test"][1],
                                   source=f"{ds.source.uri} (sha256 {fp.sha256[:12]})"))
        return out


def _keys(name: str, source, files) -> list[str]:
    """Every row's identity, in file and row order, without decoding (Parquet: from each footer)."""
    from trainers import byo

    if source.format != "parquet":
        return [byo.row_key(f.rel) for f in files]
    keys = []
    for f in files:
        rows = byo.parquet_file(name, source, f).metadata.num_rows
        keys += [byo.row_key(f.rel, i) for i in range(1, rows + 1)]
    return keys


def materialise_text(ds: Dataset, fp: Fingerprint, data_dir: Path) -> Path:
    """Read and check every document once; write the train and validation text as one JSON."""
    from trainers import byo

    out = _byo_dir(data_dir) / f"{ds.name}-{fp.sha256[:16]}.json"
    with _file_lock(out.with_suffix(".lock")):
        if out.exists():
            return out
        docs = list(byo.iter_documents(ds.name, ds.source))
        if ds.test_source is not None:
            train = [d.text for d in docs]
            validation = [d.text for d in byo.iter_documents(ds.name, ds.test_source)]
        else:
            train, validation = byo.split_documents(ds.name, docs, ds.test_fraction)
        corpus = {"train": "\n\n".join(train), "validation": "\n\n".join(validation),
                  "source": f"{ds.source.uri} (sha256 {fp.sha256[:12]})"}
        if not corpus["train"].strip() or not corpus["validation"].strip():
            raise DataError(f"dataset {ds.name}: the training or the held-out text is empty. To fix: add "
                            "documents (or a test_source).", field="params.dataset")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(corpus))
        os.replace(tmp, out)
        return out


def load_text_tokens(data_dir: str | os.PathLike, info: dict, tokenizer, tokenizer_source: str, *,
                     offline: bool | None = None):
    """The token ids of a text dataset (trainers.text_data.TokenSplits), tokenized once and cached."""
    from trainers.text_data import load_tokens

    fp = info["fingerprint"]
    name = fp["source"].split(":", 1)[1] if fp["format"] == "builtin" else fp["name"]
    return load_tokens(Path(data_dir), name, tokenizer, tokenizer_source, offline=offline,
                       corpus_path=corpus_path(info))


def check_token_counts(info: dict, train_tokens: int, validation_tokens: int, *, block_size: int,
                       batch: int, workers: int) -> None:
    """Enough text for one optimizer step and one held-out block per worker, else a DataError now."""
    name = info["fingerprint"]["name"]
    if train_tokens < block_size * batch:
        raise DataError(f"dataset {name}: {train_tokens:,} training tokens cannot fill one step of {batch} blocks of "
                        f"{block_size}. To fix: add text, or lower --block-size / --batch-size.",
                        field="params.dataset")
    if validation_tokens < block_size * workers:
        raise DataError(f"dataset {name}: {validation_tokens:,} held-out tokens make fewer than one block of "
                        f"{block_size} per worker. To fix: hold out more (test_fraction, test_source) or lower "
                        "--block-size.", field="params.dataset")


# --------------------------------------------------------------------------- looking at it


def preview(ds: Dataset, data_dir: Path, rows: int = 5, *, width: int = 120) -> list[dict[str, Any]]:
    """The dataset's first `rows` rows, for people: images as their size and label (never pixels),
    text cut at `width` characters. Reads only what it shows (a built-in is loaded, fetched if absent)."""
    from trainers import byo

    out: list[dict[str, Any]] = []
    if ds.builtin and ds.kind == "images":
        a = load_mnist(data_dir)
        return [{"row": i + 1, "split": "train", "label": int(a.train_labels[i]),
                 "image": "x".join(map(str, a.train_images[i].shape)) + " uint8"}
                for i in range(min(rows, len(a.train_labels)))]
    if ds.builtin:
        from trainers.text_data import load_corpus

        lines = load_corpus(Path(data_dir), ds.source.builtin_name).train.split("\n")
        shown = [(i, line) for i, line in enumerate(lines[:rows * 20]) if line.strip()][:rows]
        return [{"line": i + 1, "text": _cut(line, width)} for i, line in shown]
    files = byo.data_files(ds.name, ds.source)
    if ds.format == "image-dir":
        for f in files[:rows]:
            raw = byo.read_bytes(ds.source, f)
            out.append({"row": len(out) + 1, "file": f.rel, "label": byo.image_dir_label(ds.name, f),
                        "image": _image_shape(raw)})
    elif ds.format == "parquet":
        for f in files:
            for first, batch in byo.parquet_batches(ds.name, ds.source, f):
                for i, (image, label) in enumerate(zip(batch.column("image").to_pylist(),
                                                       batch.column("label").to_pylist())):
                    shape = (_image_shape(image) if isinstance(image, bytes) else
                             f"{len(image)} pixel values" if image is not None else "null")
                    out.append({"row": first + i, "file": f.rel, "label": label, "image": shape})
                    if len(out) >= rows:
                        return out
                break
    else:
        for doc in byo.iter_documents(ds.name, ds.source, files):
            out.append({"row": len(out) + 1, "id": doc.key, "text": _cut(doc.text, width)})
            if len(out) >= rows:
                break
    return out


def _image_shape(raw: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            return f"{img.width}x{img.height} {img.format} {img.mode} -> 28x28 L"
    except Exception as exc:  # noqa: BLE001 - a preview names the problem; `show`/training refuse it properly
        return f"unreadable ({type(exc).__name__})"


def _cut(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."
