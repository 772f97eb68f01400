import socket

from trainers.tracking import RunTracker, TrackingUnavailable, check_server

import pytest


def closed_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_is_reported_with_a_fix():
    with pytest.raises(TrackingUnavailable, match="unreachable.*oppen up"):
        check_server(closed_uri())


def test_tracker_keeps_values_when_the_server_is_gone():
    tracker = RunTracker(closed_uri(), run_id="0" * 32)
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0, "acc": 0.5}, step=1)
    assert tracker.flush() is False
    assert tracker.unsent == 3 and tracker.lost_since is not None
    assert "3 value(s) not logged" in tracker.report()


def test_a_background_tracker_keeps_values_until_its_client_is_ready_and_then_tries(tmp_path):
    """Rank 0's tracker connects in a thread (RunTracker.background): values logged meanwhile are kept,
    and the first flush waits for the client, then sends them (to a real SQLite-backed store here)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("t")).info.run_id
    tracker = RunTracker(uri, run_id, background=True)
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"oppen.phase.loop_at": "1.0"})
    assert tracker.flush() is True and tracker.unsent == 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 1.0}
    assert run.data.tags["oppen.phase.loop_at"] == "1.0"
    gone = RunTracker(closed_uri(), run_id="0" * 32, background=True)
    gone.log_metrics({"loss": 1.0}, step=1)
    assert gone.flush() is False and gone.unsent == 1
