"""Shared fixtures. Integration fixtures start real services and stop them by PID.

The real MNIST is fetched once per machine into a cache (`.oppen/test-cache`, or
$OPPEN_TEST_CACHE) and copied into each test's own data dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def mnist_cache() -> Path:
    from trainers.data import load_mnist

    cache = Path(os.environ.get("OPPEN_TEST_CACHE") or ROOT / ".oppen" / "test-cache")
    cache.mkdir(parents=True, exist_ok=True)
    load_mnist(cache)  # fetches and checks once; later sessions hit the cache
    return cache


@pytest.fixture()
def data_dir(tmp_path: Path, mnist_cache: Path) -> Path:
    """A fresh data dir that already holds the cached MNIST."""
    d = tmp_path / "data"
    (d / "datasets").mkdir(parents=True)
    for name in ("mnist.npz", "mnist.json"):
        shutil.copy(mnist_cache / "datasets" / name, d / "datasets" / name)
    return d
