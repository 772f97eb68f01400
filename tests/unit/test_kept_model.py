"""A model replica that starts while the registry is unreachable (a real closed port, MLflow's real
client) serves the version its replicas loaded last, kept on disk, read with a download's checks."""
import socket
import stat

import mlflow
import numpy as np
import pytest
import torch

from ray_apps.config import MlflowSettings, Settings
from ray_apps.serve import served_models
from ray_apps.serve.served_models import KeptCopy, MnistModel, forward
from trainers import mnist
from trainers.mnist_model import MnistCNN
from trainers.registry import MODEL_DIR, ModelVersion


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_folder(root, seed: int):
    """A trained-looking MnistCNN in the platform's stored form (as rank 0 writes it)."""
    torch.manual_seed(seed)
    model = MnistCNN(6)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.copy_(torch.randn_like(p.float()).to(p.dtype))
    root.mkdir()
    mnist.write_final_model(root, 6, model)
    return root / MODEL_DIR, model.eval()


def version(v: str) -> ModelVersion:
    return ModelVersion(name="mnist", version=v, run_id=f"run-{v}", source=f"models:/mnist/{v}")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Settings whose MLflow is a port nothing listens on; the replica is made outside Serve."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(data_dir=tmp_path / "data", mlflow=MlflowSettings(port=closed_port()))
    monkeypatch.setattr(served_models, "load_settings", lambda: settings)
    replicas = []
    yield settings, lambda: replicas.append(MnistModel.func_or_class()) or replicas[-1]
    for replica in replicas:
        replica._stop.set()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_a_replica_started_without_the_registry_serves_the_kept_version(offline, tmp_path):
    settings, start = offline
    folder, trained = model_folder(tmp_path / "v3", seed=3)
    KeptCopy(settings.data_dir / "served" / "mnist").save(folder, version("3"))

    replica = start()
    status = replica.status()
    assert status["version"] == "3" and status["run_id"] == "run-3"
    assert "registry unreachable" in status["problem"]  # and it says so
    mv, served = replica._serving()
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(forward(served, images), forward(trained, images))


def test_nothing_kept_means_nothing_served_and_the_reason(offline):
    _, start = offline
    replica = start()
    assert replica.status()["version"] is None
    answer = replica._serving()
    assert answer["error"]["status"] == 503 and "registry unreachable" in answer["error"]["reason"], answer


def test_a_kept_copy_with_a_pickle_in_it_is_refused_unread(offline, tmp_path):
    settings, start = offline
    folder, _ = model_folder(tmp_path / "v4", seed=4)
    (folder / "model.pkl").write_bytes(b"not to be unpickled")
    KeptCopy(settings.data_dir / "served" / "mnist").save(folder, version("4"))
    assert start().status()["version"] is None


def test_only_the_version_loaded_last_is_kept_and_only_its_owner_reads_it(tmp_path):
    kept = KeptCopy(tmp_path / "served" / "mnist")
    assert kept.read() is None
    for v, seed in (("1", 1), ("2", 2)):
        kept.save(model_folder(tmp_path / f"v{v}", seed)[0], version(v))
    kept.save(model_folder(tmp_path / "again", 2)[0], version("2"))  # a second replica, same version
    folder, mv = kept.read()
    assert mv == version("2") and (folder / "model.safetensors").exists()
    assert sorted(p.name for p in kept.root.iterdir()) == ["2", "current"]
    for d in (kept.root, kept.root.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    with pytest.raises(OSError, match="not a number"):  # a version names a folder
        kept.save(model_folder(tmp_path / "odd", 3)[0], version("../../x"))
    assert kept.read()[1] == version("2")
