"""Where the queue reads what the cluster holds: the GCS for a head it started (a job's freed CPUs show
within about a second), the dashboard only for a remote single head (its cluster status is the
autoscaler's report, refreshed every 5 s). The readers are replaced here: no Ray runs."""
import pytest

from ray_apps.autoscaler import ClusterState, NodeView
from ray_apps.config import Settings
from ray_apps.ray_client import Resources
from ray_apps.scheduler import capacity
from ray_apps.topology import load_topology

SINGLE_HEAD = load_topology("configs/cluster.single-head.yaml")


@pytest.fixture()
def readers(monkeypatch):
    calls = []
    monkeypatch.setattr(capacity, "cluster_state", lambda gcs, topology: calls.append(("gcs", gcs)) or ClusterState(
        nodes=[NodeView("head", total={"CPU": 2.0, "GPU": 2.0}, available={"CPU": 2.0, "GPU": 2.0})]))
    monkeypatch.setattr(capacity, "cluster_resources", lambda url: calls.append(("dashboard", url)) or Resources(
        used={"CPU": 2.0}, total={"CPU": 2.0}, by_node={"head": {"CPU": (2.0, 2.0)}}))
    return calls


def test_a_local_single_head_is_read_from_the_gcs(readers, tmp_path):
    settings = Settings(data_dir=tmp_path)
    cap = capacity.read_capacity(settings, SINGLE_HEAD)
    assert readers == [("gcs", settings.gcs_address)]
    assert cap.resources.by_node == {"head": {"CPU": (0.0, 2.0), "GPU": (0.0, 2.0)}} and cap.addable == []


def test_a_remote_single_head_is_read_from_its_dashboard(readers, tmp_path):
    settings = Settings(data_dir=tmp_path, ray_address="http://ray-head.example:8265")
    cap = capacity.read_capacity(settings, SINGLE_HEAD)
    assert readers == [("dashboard", "http://ray-head.example:8265")] and cap.resources.used == {"CPU": 2.0}
