"""The dispatcher's standing ask to Ray's autoscaler: sent when it changes, sent again while it stands
(Ray Train's coordinator rewrites the one cluster-wide ask), withdrawn once. The GCS call itself is
replaced by a recorder here; tests/integration/test_autoscaling.py sends it to a real autoscaler."""
import pytest

from ray_apps import autoscaler
from ray_apps.scheduler.dispatcher import worker_bundles
from ray_apps.scheduler.policy import Gang


@pytest.fixture()
def sent(monkeypatch):
    calls = []
    monkeypatch.setattr(autoscaler.ResourceRequester, "_send", lambda self, bundles: calls.append(bundles))
    return calls


def test_a_standing_ask_is_refreshed_and_a_withdrawal_sent_once(sent, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(autoscaler.time, "monotonic", lambda: clock[0])
    req = autoscaler.ResourceRequester("127.0.0.1:6379", refresh_s=2.0)
    ask = worker_bundles(Gang(2, 1, 1))
    assert ask == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert req.request(ask) and sent == [[{"CPU": 1.0, "GPU": 1.0}] * 2]
    clock[0] += 1
    assert not req.request(list(reversed(ask)))     # the same ask, not due yet
    clock[0] += 1.5
    assert req.request(ask) and len(sent) == 2      # due again: Ray may have lost it
    assert req.withdraw() and sent[-1] == []
    clock[0] += 10
    assert not req.withdraw() and len(sent) == 3    # nothing stands: nothing to repeat


def test_zero_resources_are_left_out_of_bundles(sent):
    autoscaler.ResourceRequester("x:1").request(worker_bundles(Gang(1, 2, 0)))
    assert sent == [[{"CPU": 2.0}]]
