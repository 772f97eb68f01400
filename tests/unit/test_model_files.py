"""Registered models are stored as weights and served without unpickling: a model logged the
platform's way round-trips through a real MLflow (SQLite store) into the serving loader; a pickled
version is refused unread; the predict route decodes PNGs only, and none larger than 28x28."""
import base64
import io
import os
import shlex

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from ray_apps.serve.model_app import PredictRequest, decode_images
from ray_apps.serve.served_models import forward, load_llm_version, load_mnist_version
from tests.unit.test_registry import mnist_run
from trainers.errors import OppenError
from trainers.mnist_model import MnistCNN
from trainers.registry import ModelRefused, Selector, get_version, promote, register_run, set_serving


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(None)  # and its environment variables, which subprocesses would inherit
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def run_in(uri: str, trainer: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    artifacts = uri.removeprefix("sqlite:///").rsplit("/", 1)[0] + "/artifacts"
    exp = client.get_experiment_by_name(trainer) or client.get_experiment(
        client.create_experiment(trainer, artifact_location=artifacts))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return client.create_run(exp.experiment_id, tags={"oppen.trainer": trainer}).info.run_id


def test_a_model_logged_by_the_trainer_serves_the_same_predictions(uri, tmp_path):
    import ray.train

    from trainers import mnist
    from trainers.driver import RunContext

    trained = MnistCNN(6)
    with torch.no_grad():  # not the init: batch-norm statistics too
        for p in trained.state_dict().values():
            p.copy_(torch.randn_like(p.float()).to(p.dtype))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    mnist.write_final_model(ckpt, 6, trained)  # as rank 0 does with the last epoch's checkpoint
    run_id = run_in(uri, "mnist")
    ctx = RunContext(trainer="mnist", run_name="t", data_dir=tmp_path, costs_file="", uri=uri, run_id=run_id,
                     resume=False)
    mnist._log_model(ctx, ray.train.Checkpoint.from_directory(str(ckpt)), {"test_accuracy": 0.5, "epoch": 1})
    mlflow.tracking.MlflowClient(uri).set_terminated(run_id)
    mv = register_run(uri, run_id)

    served = load_mnist_version(uri, mv)
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(forward(served, images), forward(trained.eval(), images))


def test_a_last_checkpoint_without_the_model_files_is_refused_with_the_reason(uri, tmp_path):
    import ray.train

    from trainers import mnist
    from trainers.driver import RunContext

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": MnistCNN(6).state_dict(), "epoch": 1}, ckpt / mnist.CHECKPOINT_FILE)
    run_id = run_in(uri, "mnist")
    ctx = RunContext(trainer="mnist", run_name="t", data_dir=tmp_path, costs_file="", uri=uri, run_id=run_id,
                     resume=False)
    with pytest.raises(ModelRefused, match="oppen_model.json or model.safetensors"):
        mnist._log_model(ctx, ray.train.Checkpoint.from_directory(str(ckpt)), {"epoch": 1})
    assert not mlflow.tracking.MlflowClient(uri).list_artifacts(run_id)


class Payload(torch.nn.Module):
    """A 'model' whose unpickling runs a shell command: creates `marker`."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_pickled_version_is_refused_without_being_unpickled(uri, tmp_path):
    marker = tmp_path / "unpickled"
    good = register_run(uri, mnist_run(uri, 0.9))
    run_id = run_in(uri, "mnist")
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(Payload(marker), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    assert not marker.exists()
    mlflow.set_registry_uri(uri)
    bad = get_version(uri, "mnist", mlflow.register_model(f"runs:/{run_id}/model", "mnist").version)

    with pytest.raises(ModelRefused, match=rf"version {bad.version} of mnist is stored as a pickle \(MLmodel, .*data/model\.pth.*\); "
                                           r"the platform stores and serves only weights .* To fix: retrain"):
        load_mnist_version(uri, bad)
    with pytest.raises(ModelRefused, match="stored as a pickle"):
        set_serving(uri, "mnist", Selector(version=bad.version))
    with pytest.raises(ModelRefused, match="stored as a pickle"):
        promote(uri, "mnist", bad.version, "champion")
    with pytest.raises(ModelRefused, match=f"run {run_id} of mnist is stored as a pickle"):
        register_run(uri, run_id)  # registering through the platform is refused too
    assert not marker.exists()
    assert load_mnist_version(uri, good) is not None

    with pytest.raises(AttributeError):  # the old loader runs the payload, whose "model" is an exit code
        mlflow.pytorch.load_model(f"models:/mnist/{bad.version}")
    assert marker.exists()


def test_weights_that_do_not_fit_their_stated_architecture_are_refused(uri, tmp_path):
    from trainers.registry import write_model_files

    run_id = run_in(uri, "mnist")
    for width, weights_width in ((8, 4), (100_000, 4)):
        folder = tmp_path / str(width)
        folder.mkdir()
        write_model_files(folder, "mnist", {"width": width}, MnistCNN(weights_width).state_dict())
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifacts(str(folder), artifact_path="model")
        mlflow.tracking.MlflowClient(uri).set_terminated(run_id)
        mv = register_run(uri, run_id)
        with pytest.raises(ModelRefused, match=rf"do not load into MnistCNN\(width={width}\)"):
            load_mnist_version(uri, mv)
        mlflow.tracking.MlflowClient(uri).update_run(run_id, status="RUNNING")  # a new finish, a new version


def test_the_llm_round_trips_as_safetensors(uri, tmp_path, mnist_cache):
    import ray.train

    from trainers import llm
    from trainers.driver import RunContext
    from trainers.llm_model import build_model
    from trainers.specs import LlmConfig
    from trainers.tokenizer import load_gpt2_tokenizer

    tokenizer, _ = load_gpt2_tokenizer(mnist_cache, offline=True)
    trained, _ = build_model("tiny", len(tokenizer), offline=True)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": trained.state_dict()}, ckpt / llm.CHECKPOINT_FILE)
    run_id = run_in(uri, "llm")
    ctx = RunContext(trainer="llm", run_name="t", data_dir=tmp_path, costs_file="", uri=uri, run_id=run_id,
                     resume=False)
    llm._log_model(LlmConfig(model="tiny"), ctx, ray.train.Checkpoint.from_directory(str(ckpt)), tokenizer)
    mlflow.tracking.MlflowClient(uri).set_terminated(run_id)
    files = {f.path for f in mlflow.tracking.MlflowClient(uri).list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/oppen_model.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)

    model, served_tokenizer = load_llm_version(uri, register_run(uri, run_id))
    ids = served_tokenizer("The history of", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        np.testing.assert_allclose(model(ids).logits.numpy(), trained.eval()(ids).logits.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- images


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return b64(buf.getvalue())


def refusal(png_base64: list[str]) -> OppenError:
    with pytest.raises(OppenError) as exc:
        decode_images(PredictRequest(png_base64=png_base64))
    return exc.value


def test_the_predict_route_decodes_28x28_pngs_only():
    digit = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    ok = decode_images(PredictRequest(png_base64=[encoded(Image.fromarray(digit), "PNG")]))
    np.testing.assert_array_equal(ok, digit[None])

    bmp = refusal([encoded(Image.fromarray(digit), "PNG"), encoded(Image.fromarray(digit), "BMP")])
    assert bmp.status == 422 and bmp.problem() == {"kind": "refused", "field": "png_base64[1]",
                                                   "reason": "image 1 is not a base64-encoded PNG"}

    huge = encoded(Image.new("1", (20_000, 20_000)), "PNG")  # 400 M pixels, ~60 kB compressed
    assert len(huge) < 200_000
    big = refusal([huge])
    assert big.status == 422 and big.field == "png_base64[0]" and "larger than 28x28" in str(big)
    wide = refusal([encoded(Image.new("L", (4097, 28)), "PNG")])
    assert wide.status == 422 and str(wide) == "image 0 is 4097x28; expected 28x28"
