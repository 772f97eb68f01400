"""How a finished search closes its trials' MLflow child runs (a real SQLite MLflow store)."""
from mlflow.tracking import MlflowClient

from trainers.tune import _close_stopped_trials


def test_trials_asha_stopped_end_killed_and_real_failures_stay_failed(tmp_path):
    closes_trials_as_they_ended(f"sqlite:///{tmp_path / 'mlflow.db'}", "mnist")


def closes_trials_as_they_ended(uri: str, experiment: str) -> None:
    """Also run against the platform's MLflow server (tests/integration/test_platform.py): REST calls."""
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp).info.run_id

    def child(trial, status):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "oppen.tune.trial": trial}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run, status=status)
        return run

    # A stopped trial's actor dies mid-fit: its run is left RUNNING, or the interrupted fit closed it FAILED.
    # A trial training in its own process that made all its reports is ended by Tune at the last one,
    # before it closes its run: left RUNNING, but complete.
    runs = {"done": child("t1", "FINISHED"), "left_running": child("t2", "RUNNING"),
            "stopped_mid_fit": child("t3", "FAILED"), "crashed": child("t4", "FAILED"),
            "ended_at_its_last_report": child("t5", "RUNNING")}
    trials = [{"trial_id": "t1", "error": None, "reports": 3}, {"trial_id": "t2", "error": None, "reports": 1},
              {"trial_id": "t3", "error": None, "reports": 1},
              {"trial_id": "t4", "error": "RuntimeError: out of memory", "reports": 3},
              {"trial_id": "t5", "error": None, "reports": 3}]
    _close_stopped_trials(uri, exp, parent, trials, units=3)

    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"done": "FINISHED", "left_running": "KILLED", "stopped_mid_fit": "KILLED", "crashed": "FAILED",
                      "ended_at_its_last_report": "FINISHED"}
    tagged = {name for name, run_id in runs.items()
              if client.get_run(run_id).data.tags.get("oppen.tune.stopped_early") == "true"}
    assert tagged == {"left_running", "stopped_mid_fit"}


def test_a_search_has_tune_add_no_result_loggers_of_its_own(monkeypatch):
    from ray.tune.utils.callback import _create_default_callbacks

    from trainers.tune import without_tune_result_files

    loggers = {"CSVLoggerCallback", "JsonLoggerCallback", "TBXLoggerCallback"}
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # restored after the test
    assert loggers <= {type(c).__name__ for c in _create_default_callbacks([], metric="m", mode="max")}
    without_tune_result_files()
    assert not loggers & {type(c).__name__ for c in _create_default_callbacks([], metric="m", mode="max")}
