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


def test_a_tracker_on_a_store_without_server_sends_through_mlflows_client(tmp_path):
    """A sqlite: or file: tracking URI has no REST API: the tracker sends through MlflowClient
    (a real SQLite-backed store here), params, tags and metrics in one batch."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("t")).info.run_id
    tracker = RunTracker(uri, run_id)
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"oppen.phase.loop_at": "1.0"})
    assert tracker.flush() is True and tracker.unsent == 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 1.0}
    assert run.data.tags["oppen.phase.loop_at"] == "1.0"


def test_a_batch_over_mlflows_caps_goes_out_in_several_requests_and_nothing_is_lost():
    class Recorder:
        def __init__(self):
            self.batches = []

        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            assert len(params) <= 100 and len(tags) <= 100 and len(metrics) + len(params) + len(tags) <= 1000
            self.batches.append((list(metrics), list(params), list(tags)))

    tracker = RunTracker("http://127.0.0.1:1", run_id="0" * 32)
    tracker._store = recorder = Recorder()
    tracker.log_params({f"p{i}": i for i in range(150)})
    tracker.set_tags({f"t{i}": i for i in range(30)})
    tracker.log_metrics({f"m{i}": float(i) for i in range(1500)}, step=1)
    assert tracker.flush() is True and tracker.unsent == 0
    assert len(recorder.batches) == 2  # 1,680 values, 150 params: two requests are the fewest
    sent = [sum(len(b[i]) for b in recorder.batches) for i in range(3)]
    assert sent == [1500, 150, 30]


def test_metric_values_that_json_cannot_spell_are_sent_as_protobuf_spells_them():
    from trainers.mlflow_calls import _json_double

    assert [_json_double(v) for v in (1.5, float("nan"), float("inf"), float("-inf"))] == [
        1.5, "NaN", "Infinity", "-Infinity"]
