"""The cluster topology: refused when wrong (file, field, fix), rendered into Ray's autoscaler
config, and the one source that the KubeRay RayCluster and Terraform's defaults agree with."""
from pathlib import Path

import pytest
import yaml

from ray_apps import cluster
from ray_apps.config import PROJECT_ROOT, Settings
from ray_apps.ray_client import PlatformError
from ray_apps.topology import (HEAD_NODE_TYPE, TopologyError, addable_nodes, autoscaler_config, check_fits_machine,
                               expected_kuberay_groups, kuberay_groups, load_topology)
from tests.unit.tf import blocks, load_tf

DEFAULT = PROJECT_ROOT / "configs" / "cluster.yaml"
GPU_GROUP = {"name": "gpu", "cpus": 1, "gpus": 1, "min_workers": 0, "max_workers": 2}


def write(tmp_path: Path, topology: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


@pytest.mark.parametrize("topology, field, words", [
    ({"worker_groups": [{**GPU_GROUP, "min_workers": 3}]}, "worker_groups.gpu", "min_workers (3) is above max"),
    ({"worker_groups": [{**GPU_GROUP, "cpus": 0}]}, "worker_groups.gpu.cpus", "greater than 0"),
    ({"worker_groups": [GPU_GROUP, GPU_GROUP]}, "worker_groups", "used twice: gpu"),
    ({"worker_groups": [{**GPU_GROUP, "gpu_count": 1}]}, "worker_groups.gpu.gpu_count", "remove it"),
    ({"head": {"gpus": 2}, "worker_groups": [GPU_GROUP]}, "(file)", "both on the head"),
    ({"worker_groups": [{**GPU_GROUP, "max_workers": "many"}]}, "worker_groups.gpu.max_workers", "integer"),
    ({"worker_groups": [{**GPU_GROUP, "kubernetes": {"min_workers": 3}}]}, "worker_groups.gpu",
     "on Kubernetes, min_workers (3) is above max_workers (2)"),
])
def test_a_bad_topology_names_file_field_and_fix(tmp_path, topology, field, words):
    path = write(tmp_path, topology)
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    msg = str(err.value)
    assert str(path) in msg and f"  {field}:" in msg and words in msg and "To fix" in msg, msg


def test_oppen_up_refuses_a_bad_topology_before_starting_anything(tmp_path):
    path = write(tmp_path, {"worker_groups": [{**GPU_GROUP, "min_workers": 5}]})
    settings = Settings(data_dir=tmp_path / "data", cluster_file=path)
    with pytest.raises(PlatformError, match="min_workers"):
        cluster.up(settings, say=lambda _: None)
    assert not (tmp_path / "data").exists()  # nothing started, not even the data dir


def test_maxima_this_machine_cannot_hold_are_refused_with_the_numbers(tmp_path):
    path = write(tmp_path, {"worker_groups": [{**GPU_GROUP, "memory_gib": 16, "max_workers": 4}]})
    with pytest.raises(TopologyError) as err:
        check_fits_machine(load_topology(path), path, total_memory_gib=24)
    assert "64 GiB" in str(err.value) and "gpu 4 x 16 GiB" in str(err.value) and "24.0 GiB" in str(err.value)
    check_fits_machine(load_topology(DEFAULT), DEFAULT, total_memory_gib=24)  # the shipped default fits


def test_rendered_for_ray_s_fake_multi_node_autoscaler():
    topology = load_topology(DEFAULT)
    cfg = autoscaler_config(topology, gcs_address="127.0.0.1:6379")
    assert cfg["provider"]["type"] == "external" and cfg["provider"]["gcs_address"] == "127.0.0.1:6379"
    from ray._common.utils import load_class
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    assert issubclass(load_class(cfg["provider"]["module"]), FakeMultiNodeProvider)
    types = cfg["available_node_types"]
    assert types[HEAD_NODE_TYPE] == {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    assert types["gpu"] == {"resources": {"CPU": 1, "GPU": 1}, "labels": {"oppen.io/node-group": "gpu"},
                            "node_config": {}, "min_workers": 0, "max_workers": 2}
    assert types["cpu"]["min_workers"] == 0 and types["cpu"]["resources"] == {"CPU": 2}
    assert cfg["max_workers"] == 4 and cfg["idle_timeout_minutes"] == topology.idle_timeout_s / 60
    # Each local node gets a temp dir of its own under the head's (a machine has its own disk).
    own = autoscaler_config(topology, gcs_address="127.0.0.1:6379", node_temp_root="/tmp/oppen-ray-x")
    assert own["provider"]["node_temp_root"] == "/tmp/oppen-ray-x"
    assert "--autoscaling-config" in " ".join(cluster.ray_head_command(Settings(), topology))
    assert "--num-cpus=0" in cluster.ray_head_command(Settings(), topology)


def test_a_loopback_host_keeps_ray_s_nodes_on_loopback_and_a_wildcard_leaves_the_choice_to_ray():
    topology = load_topology(DEFAULT)
    local = Settings(host="127.0.0.1")
    assert "--node-ip-address=127.0.0.1" in cluster.ray_head_command(local, topology)
    # Ray's own processes then call this machine 127.0.0.1 instead of its outward address.
    assert cluster._ray_env(local, topology)["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    config = autoscaler_config(topology, gcs_address="127.0.0.1:6379", node_ip_address="127.0.0.1")
    assert config["provider"]["node_ip_address"] == "127.0.0.1"
    public = Settings(host="0.0.0.0")
    assert not any(c.startswith("--node-ip-address") for c in cluster.ray_head_command(public, topology))
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cluster._ray_env(public, topology)


def test_single_head_topology_starts_no_autoscaler():
    topology = load_topology(PROJECT_ROOT / "configs" / "cluster.single-head.yaml")
    cmd = cluster.ray_head_command(Settings(), topology)
    assert not topology.autoscaling and "--num-gpus=2" in cmd
    assert not any(c.startswith(("--autoscaling-config", "--num-cpus")) for c in cmd)
    assert "RAY_FAKE_CLUSTER" not in cluster._ray_env(Settings(), topology)


def test_addable_nodes_are_each_group_s_max_minus_what_has_joined():
    topology = load_topology(DEFAULT)
    assert addable_nodes(topology, {"cpu": 1}) == [{"CPU": 2, "GPU": 0}] + [{"CPU": 1, "GPU": 1}] * 2
    assert addable_nodes(topology, {"cpu": 2, "gpu": 2}) == []
    assert addable_nodes(topology, {"cpu": 3}) == [{"CPU": 1, "GPU": 1}] * 2  # never negative


def test_the_kuberay_cluster_renders_the_same_groups():
    manifest = yaml.safe_load((PROJECT_ROOT / "kuberay" / "ray-cluster.kind.yaml").read_text())
    topology = load_topology(DEFAULT)
    assert kuberay_groups(manifest) == expected_kuberay_groups(topology)
    assert manifest["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == topology.kubernetes_idle_timeout_s
    head_params = manifest["spec"]["headGroupSpec"]["rayStartParams"]
    assert float(head_params["num-cpus"]) == topology.head.cpus and "num-gpus" not in head_params


def test_a_group_may_keep_a_node_warm_on_kubernetes_and_none_on_a_laptop():
    topology = load_topology(DEFAULT)
    cpu = next(g for g in topology.worker_groups if g.name == "cpu")
    assert cpu.min_workers == 0 and cpu.kubernetes_workers() == (1, 4)
    assert expected_kuberay_groups(topology)["cpu"]["min_workers"] == 1
    local = autoscaler_config(topology, gcs_address="127.0.0.1:6379")["available_node_types"]["cpu"]
    assert (local["min_workers"], local["max_workers"]) == (0, 2)


def test_terraform_defaults_are_the_topology_s_kubernetes_maxima():
    variables = blocks(load_tf(PROJECT_ROOT / "terraform" / "variables.tf"), "variable")
    expected = expected_kuberay_groups(load_topology(DEFAULT))
    assert variables["cpu_worker_max"]["default"] == expected["cpu"]["max_workers"]
    assert variables["gpu_worker_max"]["default"] == expected["gpu"]["max_workers"]


def test_a_changed_manifest_is_caught(tmp_path):
    manifest = yaml.safe_load((PROJECT_ROOT / "kuberay" / "ray-cluster.kind.yaml").read_text())
    manifest["spec"]["workerGroupSpecs"][1]["maxReplicas"] = 5
    assert kuberay_groups(manifest) != expected_kuberay_groups(load_topology(DEFAULT))
