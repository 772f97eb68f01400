"""The cluster's shape, described once (`configs/cluster.yaml`), rendered twice.

A topology is a head and named worker groups (CPUs, GPUs, accelerator type, memory,
min/max nodes) plus an idle timeout. Locally `oppen up` renders it into Ray's
autoscaling config with the fake multi-node provider, so each worker node is a real
raylet on this machine started by Ray's own autoscaler; on Kubernetes the RayCluster
in `kuberay/ray-cluster.kind.yaml` renders the same groups (a test holds the two
together; each group's `kubernetes` block gives the pod sizes where they differ
from laptop scale). A topology without worker groups is a single Ray head.

The queue reads the groups' maxima from here (Ray's autoscaler state does not carry
them): capacity = the nodes that exist + what each group may still add.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.errors import Refused
from trainers.runtime import NODE_GROUP_LABEL

HEAD_NODE_TYPE = "ray.head.default"


class TopologyError(Refused):
    """A topology file that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadSpec(_Strict):
    # None: every core of this machine (single-head mode); 0: the head runs job drivers, Serve and
    # Ray's control plane only, and training goes to worker groups (as on KubeRay).
    cpus: float | None = Field(None, ge=0)
    gpus: float = Field(0, ge=0, description="logical GPUs on the head (single-head mode on a CPU-only box)")


class KubernetesSizes(_Strict):
    """A group's pod where it differs from laptop scale (the RayCluster's resources, minReplicas and
    maxReplicas): e.g. a node kept warm on a cluster, where a laptop keeps its memory instead."""
    cpus: float | None = Field(None, gt=0)
    memory_gib: float | None = Field(None, gt=0)
    min_workers: int | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=0)


class WorkerGroup(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    cpus: float = Field(gt=0, description="CPUs per node (a group with no CPU cannot host a worker)")
    gpus: float = Field(0, ge=0)
    accelerator_type: str | None = None
    memory_gib: float = Field(2, gt=0, description="memory per node")
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(ge=0)
    kubernetes: KubernetesSizes = KubernetesSizes()

    @model_validator(mode="after")
    def _min_le_max(self) -> WorkerGroup:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers}); "
                             "lower min_workers or raise max_workers")
        k_min, k_max = self.kubernetes_workers()
        if k_min > k_max:
            raise ValueError(f"on Kubernetes, min_workers ({k_min}) is above max_workers ({k_max}); "
                             "lower kubernetes.min_workers or raise kubernetes.max_workers")
        return self

    def kubernetes_workers(self) -> tuple[int, int]:
        """The group's (minReplicas, maxReplicas) on KubeRay: its `kubernetes` block, else the laptop's."""
        k = self.kubernetes
        return (self.min_workers if k.min_workers is None else k.min_workers,
                self.max_workers if k.max_workers is None else k.max_workers)

    def node_resources(self) -> dict[str, float]:
        """What one node of this group gives Ray, as Ray names it."""
        res = {"CPU": self.cpus}
        if self.gpus:
            res["GPU"] = self.gpus
        if self.accelerator_type:
            res[f"accelerator_type:{self.accelerator_type}"] = 1
        return res

    def node_labels(self) -> dict[str, str]:
        """The Ray node labels of this group's nodes: its name, which preprocessing stages select."""
        return {NODE_GROUP_LABEL: self.name}


class Topology(_Strict):
    head: HeadSpec = HeadSpec()
    worker_groups: list[WorkerGroup] = []
    idle_timeout_s: float = Field(60, gt=0, le=86_400)
    kubernetes_idle_timeout_s: float | None = Field(None, gt=0)

    @field_validator("worker_groups")
    @classmethod
    def _unique_names(cls, groups: list[WorkerGroup]) -> list[WorkerGroup]:
        names = [g.name for g in groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"worker group name(s) used twice: {', '.join(dupes)}; give each group its own name")
        return groups

    @model_validator(mode="after")
    def _gpus_in_one_place(self) -> Topology:
        if self.worker_groups and self.head.gpus and any(g.gpus for g in self.worker_groups):
            raise ValueError("logical GPUs are declared both on the head (head.gpus) and in a worker group; "
                             "declare them in the GPU group only (set head.gpus: 0)")
        return self

    @property
    def autoscaling(self) -> bool:
        return bool(self.worker_groups)

    @property
    def preprocess_group(self) -> str | None:
        """The worker group data preprocessing runs on: the first group without GPUs, so that GPU nodes
        train while it decodes and tokenizes (None: a single head, or GPU groups only)."""
        return next((g.name for g in self.worker_groups if not g.gpus), None)

    def memory_at_max_gib(self) -> float:
        return sum(g.memory_gib * g.max_workers for g in self.worker_groups)


def load_topology(path: str | os.PathLike) -> Topology:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the cluster topology ({exc.strerror}). To fix: point "
                            "`cluster_file` in configs/platform.yaml at an existing file.") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML ({exc}). To fix: correct the syntax at that line.") from None
    try:
        return Topology(**(raw or {}))
    except TypeError:
        raise TopologyError(f"{path}: expected a mapping (head, worker_groups, idle_timeout_s).") from None
    except ValidationError as exc:
        lines = [f"invalid cluster topology in {path}:"]
        for err in exc.errors():
            field = _field_name(err["loc"], raw) or "(file)"
            fix = "remove it" if err["type"] == "extra_forbidden" else "correct it"
            lines.append(f"  {field}: {err['msg'].removeprefix('Value error, ')}. To fix: {fix} in {path.name}.")
        raise TopologyError("\n".join(lines)) from None


def _field_name(loc: tuple, raw) -> str:
    """`worker_groups.gpu.min_workers` rather than `worker_groups.1.min_workers`."""
    parts, node = [], raw
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
            parts.append(str(node.get("name", part)) if isinstance(node, dict) else str(part))
        else:
            node = node.get(part) if isinstance(node, dict) else None
            parts.append(str(part))
    return ".".join(parts)


def check_fits_machine(topology: Topology, path: Path, total_memory_gib: float | None = None) -> None:
    """Locally every node is a process on this machine: refuse maxima this machine cannot hold."""
    have = total_memory_gib if total_memory_gib is not None else psutil.virtual_memory().total / 2**30
    need = topology.memory_at_max_gib()
    if need > have:
        per_group = ", ".join(f"{g.name} {g.max_workers} x {g.memory_gib:g} GiB" for g in topology.worker_groups)
        raise TopologyError(f"{path}: at their maxima the worker groups declare {need:g} GiB ({per_group}) but "
                            f"this machine has {have:.1f} GiB. To fix: lower max_workers or memory_gib.")


# --------------------------------------------------------------------------- local rendering


def autoscaler_config(topology: Topology, *, gcs_address: str, node_temp_root: str | None = None,
                      node_ip_address: str | None = None, cluster_name: str = "oppen") -> dict:
    """Ray's autoscaling config for the fake multi-node provider: worker nodes are raylets on this machine."""
    types = {HEAD_NODE_TYPE: {"resources": {"CPU": 0} if topology.head.cpus == 0 else {}, "node_config": {},
                              "max_workers": 0}}
    # No `memory` here: the fake provider passes it to Ray as a custom resource, which Ray refuses.
    # Locally memory_gib bounds the topology against this machine (check_fits_machine).
    for g in topology.worker_groups:
        types[g.name] = {"resources": g.node_resources(), "labels": g.node_labels(), "node_config": {},
                         "min_workers": g.min_workers, "max_workers": g.max_workers}
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                   "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": cluster_name,
        "max_workers": sum(g.max_workers for g in topology.worker_groups),
        "idle_timeout_minutes": topology.idle_timeout_s / 60,
        "upscaling_speed": 1.0,
        # Ray's fake multi-node provider, through `external` so that a dead node is replaced (local_nodes.py).
        "provider": {"type": "external", "module": "ray_apps.local_nodes.LocalNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address,
                     **({"node_temp_root": node_temp_root} if node_temp_root else {}),
                     **({"node_ip_address": node_ip_address} if node_ip_address else {})},
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        "available_node_types": types, "head_node_type": HEAD_NODE_TYPE,
        **{key: [] for key in empty_lists},
    }


# --------------------------------------------------------------------------- capacity


def addable_nodes(topology: Topology, nodes_per_group: dict[str, int]) -> list[dict[str, float]]:
    """Nodes the autoscaler may still add: each group's max minus the nodes it has (running or pending)."""
    out = []
    for g in topology.worker_groups:
        for _ in range(max(0, g.max_workers - nodes_per_group.get(g.name, 0))):
            out.append({"CPU": g.cpus, "GPU": g.gpus})
    return out


# --------------------------------------------------------------------------- KubeRay rendering


def kuberay_groups(cluster: dict) -> dict[str, dict]:
    """The worker groups of a RayCluster object, in the topology's terms (for the agreement check)."""
    out = {}
    for spec in cluster["spec"].get("workerGroupSpecs", []):
        container = spec["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        params = spec.get("rayStartParams", {})
        out[spec["groupName"]] = {
            "cpus": float(params.get("num-cpus", _k8s_cpus(limits.get("cpu", "0")))),
            "gpus": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            "memory_gib": _k8s_gib(limits.get("memory", "0")),
            "min_workers": int(spec.get("minReplicas", 0)),
            "max_workers": int(spec.get("maxReplicas", 0)),
            "labels": spec.get("labels", {}),
        }
    return out


def expected_kuberay_groups(topology: Topology) -> dict[str, dict]:
    """What the RayCluster's groups must say for this topology (pod sizes from each `kubernetes` block)."""
    out = {}
    for g in topology.worker_groups:
        k = g.kubernetes
        least, most = g.kubernetes_workers()
        out[g.name] = {"cpus": k.cpus or g.cpus, "gpus": g.gpus, "memory_gib": k.memory_gib or g.memory_gib,
                       "min_workers": least, "max_workers": most, "labels": g.node_labels()}
    return out


def _k8s_cpus(value: str) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _k8s_gib(value: str) -> float:
    value = str(value)
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ki": 1 / 2**20}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value) / 2**30
