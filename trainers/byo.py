"""Bring your own data: read a catalog dataset's files, check every row, hand the trainers their arrays.

Layouts (trainers/dataset_catalog.py says which a source has):

- `image-dir`: `<root>/<label>/<file>.png` (or .jpg, .bmp, ...), label folders `0`..`9`; any size or
  colour, read as 28x28 grayscale (bilinear resize).
- `parquet`: a file or a folder of `.parquet` files with the built-in's columns: `image` (PNG/JPEG
  bytes, or a list of 784 pixel values 0-255, row by row) and `label` (an integer 0-9).
- `text-dir`: `<root>/**/*.txt`, one UTF-8 document per file.
- `jsonl`: one JSON object per line with a string field `text` (blank lines are skipped).

Every problem is a `BadData` (a DataError, field `params.dataset`) naming the dataset, the file and,
inside a file, the row (counted from 1, a JSONL row being its line): a missing column, a wrong type,
an empty file, an image that does not decode, a label outside 0-9. The driver runs `materialise_*`
before any worker starts (trainers/ingest.py), so a bad row costs seconds, not a GPU allocation.

Files are read through pyarrow's filesystems: local paths and remote URIs (`s3://...`) alike.

The held-out split is a property of the data, not of a run: a row is held out when the hash of its
identity (its file's relative path, and its row inside the file) falls under `test_fraction`, so
adding files never moves existing rows between the splits.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from trainers.data import DataError
from trainers.dataset_catalog import Source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NUM_CLASSES = 10           # MnistCNN's outputs
SIDE = 28
PIXELS = SIDE * SIDE
BATCH_ROWS = 256           # rows per batch read (image files, Parquet rows): bounds memory for large images


class BadData(DataError):
    """A dataset's file or row that cannot be trained on: `file` (and `row`, from 1) say where."""

    def __init__(self, dataset: str, file: str, reason: str, *, row: int | None = None, fix: str | None = None):
        where = file if row is None else f"{file}, row {row}"
        super().__init__(f"dataset {dataset}: {where}: {reason}." + (f" To fix: {fix}" if fix else ""),
                         field="params.dataset")
        self.file, self.row, self.reason = file, row, reason


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class FileRef:
    path: str        # as the filesystem opens it (a local path, or bucket/key)
    rel: str         # from the source's root, '/'-separated: what hashes and splits name
    shown: str       # what errors name: the full path or URI
    size: int
    mtime_ns: int


def filesystem(source: Source):
    """(pyarrow filesystem, path inside it) for a local path or a remote URI."""
    import pyarrow.fs as pafs

    if not source.remote:
        return pafs.LocalFileSystem(), source.uri
    try:
        return pafs.FileSystem.from_uri(source.uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a URI it cannot open vary by scheme
        raise DataError(f"cannot open {source.uri}: {exc}. To fix: check the URI, and this machine's network "
                        "access and credentials for it (e.g. AWS_* variables for s3://).",
                        field="params.dataset") from None


def list_files(name: str, source: Source) -> list[FileRef]:
    """The source's files (one, or a folder's, recursively, hidden ones skipped), sorted by relative path."""
    import pyarrow.fs as pafs

    fs, root = filesystem(source)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"dataset {name}: {source.uri} does not exist. To fix: correct its `source` in the "
                            "dataset catalog, or create it.", field="params.dataset")
        if info.type == pafs.FileType.File:
            return [FileRef(root, PurePosixPath(root).name, source.uri, info.size, info.mtime_ns or 0)]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot list {source.uri}: {exc}", field="params.dataset") from None
    prefix = root.rstrip("/") + "/"
    out = []
    for i in infos:
        rel = i.path[len(prefix):] if i.path.startswith(prefix) else i.path
        if i.type != pafs.FileType.File or any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(FileRef(i.path, rel, f"{source.uri.rstrip('/')}/{rel}", i.size, i.mtime_ns or 0))
    out.sort(key=lambda f: f.rel)
    if not out:
        raise BadData(name, source.uri, "the folder holds no files", fix="point `source` at the data")
    return out


def read_bytes(source: Source, ref: FileRef) -> bytes:
    fs, _ = filesystem(source)
    with fs.open_input_stream(ref.path) as stream:
        return stream.read()


def data_files(name: str, source: Source) -> list[FileRef]:
    """The files that hold rows, checked for the source's layout (names, suffixes, label folders)."""
    files = list_files(name, source)
    if source.format == "image-dir":
        for f in files:
            image_dir_label(name, f)
    elif source.format in ("parquet", "jsonl"):
        suffix = "." + source.format
        bad = [f for f in files if not f.rel.lower().endswith(suffix)]
        if bad:
            raise BadData(name, bad[0].shown, f"not a {suffix} file", fix=f"keep only {suffix} files in that folder")
    elif source.format == "text-dir":
        bad = [f for f in files if not f.rel.lower().endswith(".txt")]
        if bad:
            raise BadData(name, bad[0].shown, "not a .txt file", fix="keep only .txt files in that folder")
    return files


def image_dir_label(name: str, f: FileRef) -> int:
    parts = f.rel.split("/")
    if len(parts) != 2:
        raise BadData(name, f.shown, "images must sit one level down, in a folder named by their label",
                      fix="lay the folder out as <dir>/<label>/<file>.png with labels 0-9")
    label, file_name = parts
    if not file_name.lower().endswith(IMAGE_SUFFIXES):
        raise BadData(name, f.shown, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})",
                      fix="keep only images in the label folders")
    if not (label.isdigit() and 0 <= int(label) < NUM_CLASSES):
        raise BadData(name, f.shown, f"label {label!r} (its folder's name) is out of range: labels are the classes "
                      f"0-{NUM_CLASSES - 1}", fix=f"name the label folders 0 to {NUM_CLASSES - 1}")
    return int(label)


# --------------------------------------------------------------------------- split


def split_hash(keys: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per row identity, the same on every machine and run."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0**64
    return out


def rank_of(keys: list[str], world: int) -> np.ndarray:
    """The worker (0..world-1) a training row streams to (--data-pipeline ray-data): a second hash of its
    identity, independent of the split's, so every rank gets a like share of each label."""
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"oppen-rank").digest(),
                                "big") % world
    return out


def held_out(keys: list[str], fraction: float) -> np.ndarray:
    """Which rows the test split holds: hash below `fraction`; with 2+ rows, at least one on each side."""
    h = split_hash(keys)
    mask = h < fraction
    if len(keys) >= 2 and not mask.any():
        mask[int(np.argmin(h))] = True
    if len(keys) >= 2 and mask.all():
        mask[int(np.argmax(h))] = False
    return mask


def row_key(rel: str, row: int | None = None) -> str:
    """A row's identity: its file's relative path, and its row (from 1) inside a multi-row file."""
    return rel if row is None else f"{rel}#{row}"


# --------------------------------------------------------------------------- images


def decode_image(raw: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [28, 28] grayscale (any size or mode in); ValueError if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            gray = img.convert("L")
            if gray.size != (SIDE, SIDE):
                gray = gray.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not an image I can read"
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None


@dataclass
class ImageBatch:
    keys: list[str]
    images: np.ndarray   # uint8 [n, 28, 28]
    labels: np.ndarray   # int64 [n]


def iter_image_batches(name: str, source: Source, files: list[FileRef] | None = None) -> Iterator[ImageBatch]:
    """Every row of an images source, decoded and checked, in file and row order."""
    files = files if files is not None else data_files(name, source)
    if source.format == "image-dir":
        for start in range(0, len(files), BATCH_ROWS):
            chunk = files[start:start + BATCH_ROWS]
            images = np.empty((len(chunk), SIDE, SIDE), dtype=np.uint8)
            labels = np.empty(len(chunk), dtype=np.int64)
            for i, f in enumerate(chunk):
                labels[i] = image_dir_label(name, f)
                raw = read_bytes(source, f)
                if not raw:
                    raise BadData(name, f.shown, "empty file", fix="remove it or replace it with the image")
                try:
                    images[i] = decode_image(raw)
                except ValueError as exc:
                    raise BadData(name, f.shown, str(exc), fix="remove or replace that file") from None
            yield ImageBatch([row_key(f.rel) for f in chunk], images, labels)
    elif source.format == "parquet":
        for f in files:
            for first, batch in parquet_batches(name, source, f):
                images, labels = decode_parquet_rows(name, f.shown, first, batch.column("image"),
                                                     batch.column("label"))
                yield ImageBatch([row_key(f.rel, first + i) for i in range(len(labels))], images, labels)
    else:
        raise DataError(f"dataset {name}: {source.format} holds no images", field="params.dataset")


def parquet_file(name: str, source: Source, f: FileRef):
    """An open pyarrow ParquetFile whose schema has `image` and `label` of usable types, with rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = filesystem(source)
    try:
        pf = pq.ParquetFile(fs.open_input_file(f.path))
    except (OSError, pa.ArrowException) as exc:
        raise BadData(name, f.shown, f"not a readable Parquet file ({exc})", fix="rewrite or remove it") from None
    schema = pf.schema_arrow
    missing = [c for c in ("image", "label") if c not in schema.names]
    if missing:
        raise BadData(name, f.shown, f"missing column(s) {', '.join(missing)} (it has: {', '.join(schema.names)})",
                      fix="name the columns `image` (PNG bytes or 784 pixels) and `label` (int 0-9)")
    image_type, label_type = schema.field("image").type, schema.field("label").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type) or
            (_is_list(image_type) and pa.types.is_integer(image_type.value_type))):
        raise BadData(name, f.shown, f"column `image` is {image_type}: expected encoded image bytes (binary) or a "
                      f"list of {PIXELS} integer pixel values", fix="store PNG bytes or uint8 pixel lists")
    if not pa.types.is_integer(label_type):
        raise BadData(name, f.shown, f"column `label` is {label_type}: expected integers 0-{NUM_CLASSES - 1}",
                      fix="store labels as integers")
    if pf.metadata.num_rows == 0:
        raise BadData(name, f.shown, "empty file (no rows)", fix="remove it")
    return pf


def _is_list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def parquet_batches(name: str, source: Source, f: FileRef, columns=("image", "label")):
    """(first row number from 1, RecordBatch) over one checked Parquet file."""
    pf = parquet_file(name, source, f)
    first = 1
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
        yield first, batch
        first += batch.num_rows


def decode_parquet_rows(name: str, file: str, first: int, image_col, label_col) -> tuple[np.ndarray, np.ndarray]:
    """Arrow `image` and `label` columns of rows `first`.. -> uint8 [n, 28, 28], int64 [n]; BadData at the
    first bad row."""
    import pyarrow as pa

    n = len(label_col)
    if label_col.null_count:
        bad = int(np.flatnonzero(np.asarray(label_col.is_null()))[0])
        raise BadData(name, file, "label is null", row=first + bad, fix="give every row a label 0-9")
    labels = np.asarray(label_col.to_numpy(zero_copy_only=False), dtype=np.int64)
    out_of_range = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if out_of_range.size:
        i = int(out_of_range[0])
        raise BadData(name, file, f"label {labels[i]} is out of range: labels are the classes 0-{NUM_CLASSES - 1}",
                      row=first + i, fix="fix the label or drop the row")
    if image_col.null_count:
        bad = int(np.flatnonzero(np.asarray(image_col.is_null()))[0])
        raise BadData(name, file, "image is null", row=first + bad, fix="give every row an image")
    images = np.empty((n, SIDE, SIDE), dtype=np.uint8)
    if pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type):
        for i, raw in enumerate(image_col.to_pylist()):
            try:
                images[i] = decode_image(raw)
            except ValueError as exc:
                raise BadData(name, file, str(exc), row=first + i, fix="re-encode that image") from None
        return images, labels
    if isinstance(image_col, pa.ChunkedArray):
        image_col = image_col.combine_chunks()
    lengths = np.asarray(image_col.value_lengths().to_numpy(zero_copy_only=False)) \
        if not pa.types.is_fixed_size_list(image_col.type) else np.full(n, image_col.type.list_size)
    wrong = np.flatnonzero(lengths != PIXELS)
    if wrong.size:
        i = int(wrong[0])
        raise BadData(name, file, f"image has {int(lengths[i])} pixel values, expected {PIXELS} (28x28)",
                      row=first + i, fix=f"store 28x28 images as {PIXELS} values, or as PNG bytes (any size)")
    values = np.asarray(image_col.flatten().to_numpy(zero_copy_only=False))
    bad = np.flatnonzero((values < 0) | (values > 255))
    if bad.size:
        i = int(bad[0]) // PIXELS
        raise BadData(name, file, f"pixel value {values[bad[0]]} is outside 0-255", row=first + i,
                      fix="store pixels as 0-255")
    images[:] = values.astype(np.uint8).reshape(n, SIDE, SIDE)
    return images, labels


# --------------------------------------------------------------------------- text


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def iter_documents(name: str, source: Source, files: list[FileRef] | None = None) -> Iterator[Document]:
    """Every document of a text source, checked, in file and line order."""
    files = files if files is not None else data_files(name, source)
    for f in files:
        raw = read_bytes(source, f)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise BadData(name, f.shown, f"not UTF-8 text (byte {exc.start}, line {line})",
                          fix="save it as UTF-8") from None
        if not text.strip():
            raise BadData(name, f.shown, "empty file", fix="remove it or give it text")
        if source.format == "text-dir":
            yield Document(row_key(f.rel), text)
            continue
        ordinal = 0  # rows are the non-blank lines; a row's identity is its ordinal, errors name its line
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            ordinal += 1
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BadData(name, f.shown, f"not JSON ({exc})", row=number, fix="one JSON object per line") from None
            if not isinstance(row, dict):
                raise BadData(name, f.shown, f"a JSON {type(row).__name__}, not an object with a `text` field",
                              row=number, fix='write each line as {"text": "..."}')
            if "text" not in row:
                raise BadData(name, f.shown, f"missing field `text` (it has: {', '.join(row) or 'nothing'})",
                              row=number, fix='give every line a "text" field')
            if not isinstance(row["text"], str):
                raise BadData(name, f.shown, f"field `text` is a JSON {type(row['text']).__name__}, expected a string",
                              row=number, fix="store the text as a string")
            yield Document(row_key(f.rel, ordinal), row["text"])


def split_documents(name: str, docs: list[Document], fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts). One document alone is split by characters at a line break."""
    if not docs:
        raise DataError(f"dataset {name}: no documents", field="params.dataset")
    if len(docs) == 1:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - fraction))
        return [text[:cut]], [text[cut:]]
    mask = held_out([d.key for d in docs], fraction)
    return [d.text for d, m in zip(docs, mask) if not m], [d.text for d, m in zip(docs, mask) if m]
