"""Opening a job's MLflow run: its tags go in the request that creates it, or in one batch when the run
is reopened (a real SQLite MLflow store)."""
from mlflow.tracking import MlflowClient

from trainers.tracking import open_run


def test_a_new_run_carries_its_name_and_tags_and_a_reopened_one_gets_its_new_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, experiment="mnist", run_name="mnist-1", tags={"oppen.tenant": "team-a", "attempt": 1})
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "mnist-1" and run.info.status == "RUNNING"
    assert run.data.tags["oppen.tenant"] == "team-a" and run.data.tags["attempt"] == "1"
    assert client.get_experiment(run.info.experiment_id).name == "mnist"

    client.set_terminated(run_id, status="FAILED")
    again = open_run(uri, experiment="mnist", run_name="mnist-1", run_id=run_id, tags={"attempt": 2})
    run = client.get_run(again)
    assert again == run_id and run.info.status == "RUNNING"
    assert run.data.tags["attempt"] == "2" and run.data.tags["oppen.tenant"] == "team-a"
    assert run.info.run_name == "mnist-1"
    assert open_run(uri, experiment="mnist", run_name="mnist-2") != run_id  # same experiment, found by name
    assert len(client.search_runs([run.info.experiment_id])) == 2
