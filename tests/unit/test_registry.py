"""The model registry over a real MLflow SQLite store: registration from crafted finished runs,
the default choice (champion, else newest), aliases, the served-version tag, and the agent's
list_models / deploy_model tools on top."""
import os
import tempfile

import mlflow
import pytest

from ray_apps.agent.tools import PlatformTools
from ray_apps.config import Settings
from ray_apps.scheduler.states import JobState
from trainers.errors import Forbidden, OppenError
from trainers.mnist_model import MnistCNN
from trainers.registry import (
    ModelNotFound,
    RegistryError,
    Selector,
    list_models,
    promote,
    register_run,
    resolve,
    serving_selector,
    set_serving,
    write_model_files,
)


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_tracking_uri keeps a process-wide URI and exports it as $MLFLOW_TRACKING_URI, which
    # later tests' subprocesses would inherit: None clears both.
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def log_mnist_model(width: int = 4) -> MnistCNN:
    """Into the active run, as trainers.mnist logs it: weights and their JSON under `model/`."""
    model = MnistCNN(width).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_model_files(tmp, "mnist", {"width": width}, model.state_dict())
        mlflow.log_artifacts(tmp, artifact_path="model")
    return model


def mnist_run(uri, accuracy: float, status: str = "FINISHED") -> str:
    """A finished run that logged its model like trainers.mnist does (artifact path `model`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    artifacts = uri.removeprefix("sqlite:///").rsplit("/", 1)[0] + "/artifacts"  # not ./mlruns in the repo
    exp = client.get_experiment_by_name("mnist") or client.get_experiment(
        client.create_experiment("mnist", artifact_location=artifacts))
    run = client.create_run(exp.experiment_id, tags={"oppen.trainer": "mnist"})
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=exp.experiment_id)  # the process may hold another active experiment
    with mlflow.start_run(run_id=run.info.run_id):
        log_mnist_model()
        mlflow.log_metrics({"test_accuracy": accuracy, "cost_usd": 0.0012})
    if status != "FINISHED":
        client.set_terminated(run.info.run_id, status=status)
    mlflow.set_tracking_uri("sqlite:///:memory:")  # register_run must not rely on the global URI
    return run.info.run_id


def test_runs_become_versions_and_the_default_is_champion_else_newest(uri):
    r1, r2 = mnist_run(uri, 0.91), mnist_run(uri, 0.95)
    v1, v2 = register_run(uri, r1), register_run(uri, r2)
    assert (v1.version, v2.version) == ("1", "2") and register_run(uri, r1).version == "1"
    assert v2.tags["test_accuracy"] == "0.95" and v2.tags["cost_usd"] == "0.0012" and v2.run_id == r2
    assert resolve(uri, "mnist").version == "2"                  # no champion: the newest
    promote(uri, "mnist", "1", "champion")
    assert resolve(uri, "mnist").version == "1"                  # the champion wins
    assert resolve(uri, "mnist", Selector(version="2")).version == "2"
    listing = {m["name"]: m for m in list_models(uri)}["mnist"]
    assert [v["version"] for v in listing["versions"]] == ["2", "1"] and listing["aliases"] == {"champion": "1"}
    assert listing["versions"][1]["aliases"] == ["champion"]


def test_a_run_finished_again_after_a_resume_gets_a_new_version(uri):
    from mlflow.tracking import MlflowClient

    run_id = mnist_run(uri, 0.90)
    first = register_run(uri, run_id)
    client = MlflowClient(uri)
    client.update_run(run_id, status="RUNNING")   # resumed...
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):           # ...a new model and metric, finished again
        log_mnist_model()
        mlflow.log_metric("test_accuracy", 0.97)
    second = register_run(uri, run_id)
    assert (first.version, second.version) == ("1", "2") and second.tags["test_accuracy"] == "0.97"
    assert register_run(uri, run_id).version == "2"


def test_the_served_choice_is_a_checked_registry_tag(uri):
    register_run(uri, mnist_run(uri, 0.9))
    assert serving_selector(uri, "mnist") == Selector()
    set_serving(uri, "mnist", Selector(version="1"))
    assert serving_selector(uri, "mnist") == Selector(version="1")
    with pytest.raises(ModelNotFound, match="no version 7"):
        set_serving(uri, "mnist", Selector(version="7"))
    with pytest.raises(ModelNotFound, match="no alias 'gold'"):
        set_serving(uri, "mnist", Selector(alias="gold"))
    assert serving_selector(uri, "mnist") == Selector(version="1")  # a refused choice changes nothing


def test_bad_registrations_and_names_are_refused_with_the_reason(uri):
    with pytest.raises(RegistryError, match="only a finished run"):
        register_run(uri, mnist_run(uri, 0.9, status="FAILED"))
    with pytest.raises(ModelNotFound, match="no MLflow run"):
        register_run(uri, "0" * 32)
    with pytest.raises(ModelNotFound, match="no model 'cifar'"):
        resolve(uri, "cifar")
    with pytest.raises(ModelNotFound, match="no version of 'llm' is registered yet"):
        resolve(uri, "llm")
    register_run(uri, mnist_run(uri, 0.9))
    with pytest.raises(RegistryError, match="alias must be a name"):
        promote(uri, "mnist", "1", "3")
    with pytest.raises(RegistryError, match="whole number"):
        promote(uri, "mnist", "latest", "champion")


def test_agent_tools_list_and_deploy_models(uri, tmp_path):
    run_id = mnist_run(uri, 0.93)
    register_run(uri, run_id)
    mlflow.set_tracking_uri(None)  # Settings would read the SQLite URI from the environment
    settings = Settings(data_dir=tmp_path)
    settings.mlflow_tracking_uri = uri  # the SQLite store; assignment skips the http(s)-only validator
    tools = PlatformTools(settings)
    listed = tools.call("list_models", {})["models"]
    assert listed[0]["name"] == "mnist" and listed[0]["versions"][0]["tags"]["test_accuracy"] == "0.93"
    # A run no job of the queue made is not served (anyone can register one in MLflow).
    with pytest.raises(RegistryError, match="no job of this platform's queue made"):
        tools.call("deploy_model", {"name": "mnist", "version": "1"})
    tools.queue.store.add(id="mnist-1", trainer="mnist", params={}, tenant="a", priority="normal", workers=1,
                          cpus_per_worker=1.0, gpus_per_worker=0.0)
    tools.queue.store.transition("mnist-1", JobState.STARTING, mlflow_run_id=run_id)
    deployed = tools.call("deploy_model", {"name": "mnist", "version": "1"})
    assert deployed["version"] == "1" and deployed["endpoint"].endswith("/v1/models/mnist/predict")
    assert serving_selector(uri, "mnist") == Selector(version="1")
    for args, reason in (({"name": "mnist", "version": "4"}, "no version 4"), ({"name": "cifar"}, "no model"),
                         ({"name": "mnist", "version": "1", "alias": "champion"}, "not both"),
                         ({"name": "mnist", "path": "/etc"}, "bad arguments")):
        with pytest.raises(OppenError, match=reason):
            tools.call("deploy_model", args)
    # A tenant's member may not change what every tenant is served, through the agent either.
    with pytest.raises(Forbidden, match="needs the admin role"):
        tools.for_caller("team-b", admin=False).call("deploy_model", {"name": "mnist", "version": "1"})
