"""The dataset catalog: named, typed inputs for the trainers (`configs/datasets.yaml`).

A trainer takes `--dataset NAME`; the name is looked up here, so a run names its data the way
it names its hyperparameters, and the catalog (not the code) says where the data lives:

- `kind`: `images` (the MNIST-style classifier) or `text` (the language-model trainer). A
  trainer's `dataset` field says which kind it takes (field metadata `dataset_kind`).
- `source`: `builtin:<name>` (the loaders of trainers/data.py and trainers/text_data.py, with
  their offline fallbacks), a local path, or a remote URI pyarrow reads (`s3://...`).
- `format`: how the files are laid out, inferred from the path when not given: a folder of
  `<label>/<file>.png` (`image-dir`), Parquet (`parquet`: a file or a folder of them), a folder
  of `.txt` files (`text-dir`) or a `.jsonl` file (`jsonl`).
- `test_fraction` / `test_source`: the held-out split.

Loading validates every entry with pydantic into typed values; a bad entry is a DataError naming
the file and the field (`datasets.<name>.<field>`). Light imports (YAML, pydantic): the trainer
catalog (trainers/specs.py) checks `--dataset` against this at every config it builds. The
content hash, rows and schema of a dataset are trainers/fingerprint.py's; reading the files is
trainers/byo.py's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from trainers.errors import Refused

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "configs" / "datasets.yaml"
KINDS = ("images", "text")
# The built-in sources and the kind each gives (trainers/data.py, trainers/text_data.py).
BUILTINS = {"mnist": "images", "wikitext-2": "text", "shakespeare": "text", "pydoc": "text"}
# File layouts per kind; `builtin` is a source of its own.
FORMATS = {"images": ("image-dir", "parquet"), "text": ("text-dir", "jsonl")}
# Remote filesystems pyarrow knows by URI scheme (whether this pyarrow build has each is checked
# when the data is read, not when the catalog loads: these machines are offline).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class DatasetError(Refused):
    """A dataset catalog entry, or the catalog file, is wrong; `field` names the entry's field."""


@dataclass(frozen=True)
class Source:
    """Where a dataset's bytes are: `uri` is `builtin:<name>`, an absolute local path, or a remote URI."""

    uri: str
    format: str          # builtin, image-dir, parquet, text-dir, jsonl

    @property
    def builtin(self) -> bool:
        return self.format == "builtin"

    @property
    def remote(self) -> bool:
        return urlsplit(self.uri).scheme in REMOTE_SCHEMES

    @property
    def builtin_name(self) -> str:
        return self.uri.split(":", 1)[1]

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class Dataset:
    """One catalog entry, resolved: sources parsed, paths absolute."""

    name: str
    kind: str
    description: str
    source: Source
    test_source: Source | None = None
    test_fraction: float = 0.1

    @property
    def builtin(self) -> bool:
        return self.source.builtin

    @property
    def format(self) -> str:
        return self.source.format


def parse_source(text: str, *, kind: str, base: Path, format: str | None = None) -> Source:
    """A Source from the catalog's text, or ValueError saying what is wrong (no I/O: offline safe)."""
    text = text.strip()
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if BUILTINS.get(name) != kind:
            known = [n for n, k in BUILTINS.items() if k == kind]
            raise ValueError(f"no built-in {kind} dataset {name!r}; built-in {kind}: {', '.join(known)}")
        if format is not None:
            raise ValueError("a builtin source has no `format`")
        return Source(text, "builtin")
    parts = urlsplit(text)
    if parts.scheme in REMOTE_SCHEMES:
        bucket = parts.netloc
        if not bucket or (parts.scheme == "s3" and not _BUCKET.fullmatch(bucket)):
            raise ValueError(f"{text!r} does not name a bucket (expected {parts.scheme}://<bucket>/<path>)")
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: no query or fragment, only {parts.scheme}://<bucket>/<path>")
        uri = text
    elif parts.scheme == "file":
        uri = str(Path(parts.path).expanduser().resolve())
    elif parts.scheme and len(parts.scheme) > 1:  # "C:" style drive letters aside
        raise ValueError(f"unsupported scheme {parts.scheme}:// (use builtin:, a local path, or one of "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    else:
        path = Path(text).expanduser()
        uri = str((path if path.is_absolute() else base / path).resolve())
    return Source(uri, format or _infer_format(uri, kind))


def _infer_format(uri: str, kind: str) -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix == ".parquet":
        fmt = "parquet"
    elif suffix == ".jsonl":
        fmt = "jsonl"
    elif suffix:
        raise ValueError(f"cannot tell the layout of {uri!r} from its suffix {suffix!r}: expected a folder, "
                         ".parquet or .jsonl (or set `format:`)")
    else:
        fmt = {"images": "image-dir", "text": "text-dir"}[kind]
    if fmt not in FORMATS[kind]:
        raise ValueError(f"a {fmt} source cannot hold {kind}; {kind} take {' or '.join(FORMATS[kind])}")
    return fmt


class _Entry(BaseModel):
    """One entry as written in the file (the key is its name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["images", "text"]
    source: str = Field(min_length=1)
    description: str = Field(min_length=1)
    format: Literal["image-dir", "parquet", "text-dir", "jsonl"] | None = None
    test_fraction: float = Field(0.1, gt=0, lt=1)
    test_source: str | None = None

    @field_validator("format")
    @classmethod
    def _format_fits_kind(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if value is not None and kind in FORMATS and value not in FORMATS[kind]:
            raise ValueError(f"{kind} take {' or '.join(FORMATS[kind])}, not {value}")
        return value

    def resolve(self, name: str, base: Path) -> Dataset:
        def parsed(field_name: str) -> Source | None:
            raw = getattr(self, field_name)
            if raw is None:
                return None
            try:
                return parse_source(raw, kind=self.kind, base=base, format=self.format)
            except ValueError as exc:
                raise _FieldProblem(field_name, raw, str(exc)) from None

        source, test = parsed("source"), parsed("test_source")
        if test is not None and (source.builtin or test.builtin):
            raise _FieldProblem("test_source", self.test_source, "builtin datasets come with their own split")
        return Dataset(name, self.kind, self.description, source, test, self.test_fraction)


class _FieldProblem(Exception):
    def __init__(self, field: str, value: object, reason: str):
        super().__init__(reason)
        self.field, self.value, self.reason = field, value, reason


@dataclass(frozen=True)
class Catalog:
    path: Path
    datasets: dict[str, Dataset]

    def names(self, kind: str | None = None) -> tuple[str, ...]:
        return tuple(n for n, d in self.datasets.items() if kind is None or d.kind == kind)

    def get(self, name: str, kind: str | None = None) -> Dataset:
        """The entry `name` (of `kind` when given), else a DatasetError naming `params.dataset`."""
        found = self.datasets.get(name)
        if found is None or (kind is not None and found.kind != kind):
            what = f"{kind} dataset" if kind else "dataset"
            raise DatasetError(f"no {what} {name!r} in {self.path}; known: {', '.join(self.names(kind)) or 'none'}. "
                               f"To fix: pick one of those, or add an entry under `datasets:`.",
                               field="params.dataset")
        return found


def catalog_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("OPPEN_DATASETS_FILE") or DEFAULT_CATALOG).expanduser().resolve()


_cache: dict[Path, tuple[tuple[int, int], Catalog]] = {}


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """The catalog at `path`, `$OPPEN_DATASETS_FILE` or `configs/datasets.yaml`, parsed once per
    version of the file (its mtime and size), so validating many configs reads it once."""
    file = catalog_path(path)
    try:
        stat = file.stat()
    except OSError as exc:
        raise DatasetError(f"cannot read the dataset catalog {file}: {exc.strerror}. To fix: set "
                           "OPPEN_DATASETS_FILE to the catalog's path.", field="dataset_catalog") from None
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(file)
    if cached and cached[0] == key:
        return cached[1]
    catalog = parse_catalog(file.read_text(), file)
    _cache[file] = (key, catalog)
    return catalog


def parse_catalog(text: str, path: Path) -> Catalog:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}", field="dataset_catalog") from None
    if not isinstance(data, dict) or set(data) != {"datasets"} or not isinstance(data["datasets"], dict):
        raise DatasetError(f"{path}: expected one top-level key `datasets:` mapping names to entries. "
                           "To fix: see the comments at the top of configs/datasets.yaml.", field="datasets")
    out: dict[str, Dataset] = {}
    for name, raw in data["datasets"].items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DatasetError(f"{path}: dataset name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                               "(it goes on command lines).", field=f"datasets.{name}")
        try:
            out[name] = _Entry.model_validate(raw).resolve(name, path.parent)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            got = f", got {first['input']!r}" if first["type"] not in ("missing", "model_type") else ""
            raise DatasetError(f"{path}: datasets.{name}.{where}: {first['msg']}{got}. To fix: correct that "
                               f"field ({len(exc.errors())} problem(s) in this entry).",
                               field=f"datasets.{name}.{where}") from None
        except _FieldProblem as exc:
            raise DatasetError(f"{path}: datasets.{name}.{exc.field}: {exc.reason} (got {exc.value!r}).",
                               field=f"datasets.{name}.{exc.field}") from None
    return Catalog(path, out)
