"""Model registry and serving on the real local platform: MNIST runs trained through the Jobs API
register themselves, Ray Serve serves them over real HTTP, an alias move rolls the replicas over.

The LLM version is a tiny random GPT-2 logged like the trainer logs its model (no training: the
serving path is under test here; test_llm_and_tune covers training, and the registration code is
the same `driver.finish` for both trainers). A pickled version is refused by the platform and by the
replica, and never unpickled.
"""
from __future__ import annotations

import base64
import io
import tempfile
import threading
import time

import mlflow.pytorch
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ray_apps.cluster import serve_url
from ray_apps.scheduler.api import store_url
from ray_apps.scheduler.store import JobStore
from ray_apps.serve.served_models import KeptCopy, load_mnist_version
from ray_apps.training import follow, submit_training
from trainers.data import load_mnist
from tests.unit.test_model_files import Payload  # a pickle whose loading runs a command
from trainers.registry import get_version, list_models, promote, register_run, resolve, write_model_files

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer token-a"}
ADMIN = {"Authorization": "Bearer token-admin"}  # what everyone is served is an admin's decision
TINY_MNIST = {"epochs": 1, "train_samples": 600, "test_samples": 200, "cpus_per_worker": 1, "width": 8}


@pytest.fixture(scope="module")
def models_url(platform):
    return serve_url(platform) + "/v1/models"


@pytest.fixture(scope="module")
def mnist_versions(platform):
    """Two registered MNIST versions, as (version, run id), oldest first. Every finished MNIST run
    registers itself, so in a full session the MNIST job tests have made them already (their
    trainings take minutes here); run alone, this module trains two small ones side by side."""
    mnist = next((m for m in list_models(platform.tracking_uri) if m["name"] == "mnist"), {"versions": []})
    if len({v["run_id"] for v in mnist["versions"]}) < 2:
        subs = [submit_training(platform, "mnist", {**TINY_MNIST, "seed": seed}) for seed in (1, 2)]
        outcomes = [follow(platform, s.submission_id, on_progress=lambda line: None, timeout_s=600) for s in subs]
        for outcome in outcomes:
            assert outcome.ok, "\n".join(outcome.log_tail)
            assert outcome.result["model_version"], "a finished run registers its model"
        mnist = next(m for m in list_models(platform.tracking_uri) if m["name"] == "mnist")
    latest_per_run = {}
    for v in mnist["versions"]:  # newest first; a resumed run has an older version too
        latest_per_run.setdefault(v["run_id"], v)
    newest, previous = list(latest_per_run.values())[:2]
    return [(previous["version"], previous["run_id"]), (newest["version"], newest["run_id"])]


def png(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def mnist_replica(models_url: str) -> dict:
    return next(m for m in requests.get(models_url, headers=A, timeout=30).json() if m["name"] == "mnist")["replica"]


def serve_and_wait(models_url: str, body: dict, version: str, timeout: float = 60) -> None:
    resp = requests.post(f"{models_url}/mnist/serve", json=body, headers=ADMIN, timeout=30)
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replica = mnist_replica(models_url)
        if replica["version"] == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"the MNIST replica did not load version {version} in {timeout} s: {replica}")


def test_finished_runs_register_with_their_metric_and_cost(platform, mnist_versions):
    (v1, run1), (v2, run2) = mnist_versions
    assert v1 and v2 and v1 != v2
    mnist = next(m for m in list_models(platform.tracking_uri) if m["name"] == "mnist")
    versions = {v["version"]: v for v in mnist["versions"]}
    assert versions[v1]["run_id"] == run1 and versions[v2]["run_id"] == run2
    run = MlflowClient(platform.tracking_uri).get_run(run1)
    assert float(versions[v1]["tags"]["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], rel=1e-5)
    assert float(versions[v1]["tags"]["cost_usd"]) > 0
    assert register_run(platform.tracking_uri, run1).version == v1  # registering again changes nothing


def test_served_predictions_equal_the_same_model_in_process(platform, models_url, mnist_versions):
    version, _ = mnist_versions[0]
    serve_and_wait(models_url, {"version": version}, version)
    test_images = load_mnist(platform.data_dir).test_images[:24]
    resp = requests.post(f"{models_url}/mnist/predict", json={"images": test_images[:20].tolist()}, headers=A,
                         timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == version and len(body["predictions"]) == 20

    resp_png = requests.post(f"{models_url}/mnist/predict",
                             json={"png_base64": [png(Image.fromarray(i)) for i in test_images[20:]]},
                             headers=A, timeout=60)
    assert resp_png.status_code == 200, resp_png.text
    served = np.array([p["probabilities"] for p in body["predictions"] + resp_png.json()["predictions"]])

    from trainers.mnist_model import to_tensors

    # The same registered version, loaded here (no process-wide MLflow state is set by this test).
    model = load_mnist_version(platform.tracking_uri, get_version(platform.tracking_uri, "mnist", version))
    with torch.inference_mode():
        local = torch.softmax(model(to_tensors(test_images, np.zeros(24, dtype=np.int64))[0]), dim=1).numpy()
    np.testing.assert_allclose(served, local, atol=2e-6)  # the response rounds to 6 decimals
    assert [p["digit"] for p in body["predictions"]] == local[:20].argmax(1).tolist()
    # The replica kept what it serves on disk, for a replica that starts while MLflow is down.
    kept = KeptCopy(platform.data_dir / "served" / "mnist").read()
    assert kept is not None and kept[1].version == version, kept


def test_an_alias_move_rolls_over_with_zero_failed_requests(platform, models_url, mnist_versions):
    (v1, _), (v2, _) = mnist_versions
    uri = platform.tracking_uri
    promote(uri, "mnist", v1, "champion")
    serve_and_wait(models_url, {"alias": "champion"}, v1)
    image = load_mnist(platform.data_dir).test_images[:1].tolist()
    seen, failures, stop = [], [], threading.Event()

    def client():  # bounded: stops at 90 s or 3,000 requests, whichever first
        session = requests.Session()
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline and len(seen) + len(failures) < 3000:
            try:
                r = session.post(f"{models_url}/mnist/predict", json={"images": image}, headers=A, timeout=30)
                (seen.append(r.json()["version"]) if r.status_code == 200 else failures.append(r.status_code))
            except requests.RequestException as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 50 and not failures and threads[0].is_alive():
        time.sleep(0.05)
    promote(uri, "mnist", v2, "champion")  # the move under load
    moved_at = len(seen)
    deadline = time.monotonic() + 60
    while seen[-20:].count(v2) < 20 and time.monotonic() < deadline and threads[0].is_alive():
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert failures == [], failures[:5]
    assert seen[:moved_at].count(v1) == moved_at >= 50 and v2 in seen[moved_at:]
    assert seen[-20:] == [v2] * 20  # rolled over and stayed
    print(f"alias move under load: {len(seen)} requests, 0 failed, {seen.count(v1)} on v{v1}, {seen.count(v2)} on v{v2}")


def test_a_pickled_version_is_refused_and_never_unpickled(platform, models_url, mnist_versions, tmp_path):
    _, (good, _) = mnist_versions
    uri = platform.tracking_uri
    serve_and_wait(models_url, {"version": good}, good)
    marker = tmp_path / "unpickled"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.get_experiment_by_name("mnist").experiment_id, tags={"oppen.trainer": "mnist"})
    with tempfile.TemporaryDirectory() as tmp:  # an MLflow pytorch model as the platform logged it before
        mlflow.pytorch.save_model(Payload(marker), f"{tmp}/model", serialization_format="pickle",
                                  pip_requirements=["torch"])
        client.log_artifacts(run.info.run_id, f"{tmp}/model", artifact_path="model")
    bad = client.create_model_version("mnist", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version

    # No job of the queue made this run: refused for that first; an admin's override meets the format check.
    resp = requests.post(f"{models_url}/mnist/serve", json={"version": bad}, headers=ADMIN, timeout=30)
    assert resp.status_code == 422 and "no job of this platform's queue made" in resp.json()["detail"]["reason"]
    resp = requests.post(f"{models_url}/mnist/serve", json={"version": bad, "allow_any_run": True}, headers=ADMIN,
                         timeout=30)
    assert resp.status_code == 422, resp.text
    assert f"version {bad} of mnist is stored as a pickle (MLmodel" in resp.json()["detail"]["reason"]
    # Whoever reaches MLflow can set the serving tag directly: the replica refuses the version itself,
    # for its run first, and (allowed, as an admin could) for its format.
    client.set_registered_model_tag("mnist", "oppen.serve", f"version:{bad}")
    deadline = time.monotonic() + 60
    while "no job of this platform's queue made" not in (mnist_replica(models_url)["problem"] or "") \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert mnist_replica(models_url)["version"] == good
    JobStore(store_url(platform)).allow_serving("mnist", bad)
    try:
        deadline = time.monotonic() + 60
        while "stored as a pickle" not in (mnist_replica(models_url)["problem"] or "") and time.monotonic() < deadline:
            time.sleep(0.5)
        replica = mnist_replica(models_url)
        assert replica["version"] == good and f"version {bad} of mnist is stored as a pickle" in replica["problem"]
        image = load_mnist(platform.data_dir).test_images[:1].tolist()
        served = requests.post(f"{models_url}/mnist/predict", json={"images": image}, headers=A, timeout=30)
        assert served.status_code == 200 and served.json()["version"] == good  # still the version it had
    finally:
        client.set_registered_model_tag("mnist", "oppen.serve", f"version:{good}")
    assert not marker.exists()


def test_llm_generate_serves_the_registered_version(platform, models_url):
    from trainers.llm_model import build_model
    from trainers.tokenizer import load_gpt2_tokenizer

    uri = platform.tracking_uri
    tokenizer, _ = load_gpt2_tokenizer(platform.data_dir, offline=True)
    model, _ = build_model("tiny", len(tokenizer), offline=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("llm") or client.get_experiment(client.create_experiment("llm"))
    run = client.create_run(exp.experiment_id, tags={"oppen.trainer": "llm"})
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_files(tmp, "llm", {"model": "tiny"})
        client.log_artifacts(run.info.run_id, tmp, artifact_path="model")
    client.log_metric(run.info.run_id, "eval_loss", 10.5)
    client.set_terminated(run.info.run_id, status="FINISHED")
    mv = register_run(uri, run.info.run_id)
    assert resolve(uri, "llm").version == mv.version and mv.tags["eval_loss"] == "10.5"
    # A crafted run (no job of the queue made it): served only by an admin's choice.
    allowed = requests.post(f"{models_url}/llm/serve", json={"version": mv.version, "allow_any_run": True},
                            headers=ADMIN, timeout=30)
    assert allowed.status_code == 200, allowed.text
    body = {"prompt": "The history of", "max_new_tokens": 6, "temperature": 0}
    # A replica already up (woken by an earlier request) rolls over on its next registry poll: until
    # then it may still answer what it last saw (no version registered, or an older one).
    deadline = time.monotonic() + 120
    while True:
        resp = requests.post(f"{models_url}/llm/generate", json=body, headers=A, timeout=180)  # wakes from zero
        waiting = resp.status_code == 503 and "is registered yet" in resp.text
        assert resp.status_code == 200 or (waiting and time.monotonic() < deadline), resp.text
        out = {} if waiting else resp.json()
        if out.get("version") == mv.version or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert out["version"] == mv.version and out["new_tokens"] == 6 and out["prompt_tokens"] == 3
    again = requests.post(f"{models_url}/llm/generate", json=body, headers=A, timeout=60).json()
    assert again["text"] == out["text"]  # greedy decoding is deterministic
    too_long = requests.post(f"{models_url}/llm/generate", json={**body, "prompt": "word " * 250,
                                                                  "max_new_tokens": 100}, headers=A, timeout=60)
    assert too_long.status_code == 422 and "context of 256 tokens" in too_long.json()["detail"]["reason"]


@pytest.mark.parametrize("path,body,status,names", [
    ("mnist/predict", {"images": [[[0] * 28] * 27]}, 422, "27x28"),
    ("mnist/predict", {"images": [[["x"] * 28] * 28]}, 422, "images"),
    ("mnist/predict", {"images": [[[300] * 28] * 28]}, 422, "from 0 to 255"),
    ("mnist/predict", {"images": [[[0] * 28] * 28] * 257}, 413, "at most 256"),
    ("mnist/predict", {"images": []}, 422, "no images"),
    ("mnist/predict", {"png_base64": ["not-a-png"]}, 422, "not a base64-encoded PNG"),
    ("mnist/predict", {"png_base64": [png(Image.new("L", (28, 28)), "BMP")]}, 422, "not a base64-encoded PNG"),
    ("mnist/predict", {"png_base64": [png(Image.new("1", (20_000, 20_000)))]}, 422, "far larger than 28x28"),
    ("mnist/predict", {}, 422, "exactly one of"),
    ("llm/generate", {"prompt": ""}, 422, "prompt"),
    ("llm/generate", {"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("cifar/predict", {"images": []}, 404, "no model 'cifar'"),
    ("llm/predict", {}, 404, "use 'generate'"),
    ("mnist/serve", {"version": "999"}, 404, "no version 999"),
    ("mnist/serve", {"alias": "nope"}, 404, "no alias 'nope'"),
    ("mnist/serve", {"alias": "a", "version": "1"}, 422, "exactly one of"),
])
def test_bad_requests_are_4xx_naming_the_problem(models_url, path, body, status, names):
    resp = requests.post(f"{models_url}/{path}", json=body, headers=ADMIN if path.endswith("/serve") else A,
                         timeout=30)
    assert resp.status_code == status, resp.text
    assert names in resp.text


def test_model_endpoints_need_a_tenant_token(models_url):
    assert requests.post(f"{models_url}/mnist/predict", json={"images": []}, timeout=30).status_code == 401
