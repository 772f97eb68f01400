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
