"""Ray's autoscaler, seen and asked through the GCS (no `ray.init`, no driver process).

- `cluster_state`: every joined node with its resources, and per worker group the
  nodes running, idle and still starting, read from the autoscaler's status
  (`ray.autoscaler.v2.sdk.get_cluster_status`) with the topology's min/max.
- `ResourceRequester`: asks the autoscaler to make room for bundles (what
  `ray.autoscaler.sdk.request_resources` does, sent straight to the GCS so the
  dispatcher needs no Ray driver); an empty ask withdraws it, so idle nodes scale
  back down. Ray has one ask per cluster and Ray Train's autoscaling coordinator
  rewrites it every 20 s, so a standing ask is sent again every `refresh_s`.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field

from ray_apps.topology import Topology

log = logging.getLogger("oppen.autoscaler")
RESOURCE_REQUEST_KEY = b"autoscaler_resource_request"  # the v1 autoscaler's channel (ray_constants)


@dataclass
class NodeView:
    node_id: str
    total: dict[str, float] = field(default_factory=dict)
    available: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupState:
    name: str
    running: int = 0
    idle: int = 0
    pending: int = 0
    min_workers: int = 0
    max_workers: int = 0
    cpus: float = 0.0
    gpus: float = 0.0

    @property
    def joined(self) -> int:
        return self.running + self.idle


@dataclass
class ClusterState:
    nodes: list[NodeView] = field(default_factory=list)       # joined nodes (head included)
    groups: dict[str, GroupState] = field(default_factory=dict)

    def joined_per_group(self) -> dict[str, int]:
        return {name: g.joined for name, g in self.groups.items()}


def check_reachable(gcs_address: str, timeout: float = 1.0) -> None:
    """Fail in a second when nothing listens at the GCS: Ray's own client retries for ~30 s first."""
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {gcs_address} ({exc})") from None


def cluster_state(gcs_address: str, topology: Topology) -> ClusterState:
    """Nodes and groups as the autoscaler sees them now. Raises on an unreachable GCS."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    from ray_apps.ray_client import use_ray_token

    check_reachable(gcs_address)
    use_ray_token()
    status = get_cluster_status(gcs_address, timeout=5)
    state = ClusterState(groups={g.name: GroupState(g.name, min_workers=g.min_workers, max_workers=g.max_workers,
                                                    cpus=g.cpus, gpus=g.gpus) for g in topology.worker_groups})
    for kind, nodes in (("RUNNING", status.active_nodes), ("IDLE", status.idle_nodes)):
        for n in nodes:
            state.nodes.append(NodeView(n.node_id or n.instance_id, n.total_resources(), n.available_resources()))
            group = state.groups.get(n.ray_node_type_name)
            if group is not None:
                setattr(group, kind.lower(), getattr(group, kind.lower()) + 1)
    for n in status.pending_nodes:
        if n.ray_node_type_name in state.groups:
            state.groups[n.ray_node_type_name].pending += 1
    for launch in status.pending_launches:
        if launch.ray_node_type_name in state.groups:
            state.groups[launch.ray_node_type_name].pending += launch.count
    return state


class ResourceRequester:
    """The dispatcher's standing ask to the autoscaler: the bundles that must fit the cluster at once."""

    def __init__(self, gcs_address: str, *, refresh_s: float = 2.0):
        self.gcs_address = gcs_address
        self.refresh_s = refresh_s
        self.current: list[dict[str, float]] | None = None  # None: nothing asked by this process yet
        self._sent_at = 0.0
        self._v2: bool | None = None  # which autoscaler reads the ask: asked of the GCS once

    def request(self, bundles: list[dict[str, float]]) -> bool:
        """Send `bundles` (all of them: Ray sizes the cluster for the whole ask, running work included)
        when they differ from the last ask, or when a standing ask is due again. True when sent."""
        bundles = [{k: float(v) for k, v in b.items() if v} for b in bundles]
        bundles = [b for b in bundles if b]
        same = self.current is not None and _key(bundles) == _key(self.current)
        if same and (not bundles or time.monotonic() - self._sent_at < self.refresh_s):
            return False
        self._send(bundles)
        if not same:
            log.info("autoscaler request: %s", bundles or "withdrawn")
        self.current, self._sent_at = bundles, time.monotonic()
        return True

    def withdraw(self) -> bool:
        return self.request([])

    def _send(self, bundles: list[dict[str, float]]) -> None:
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        from ray_apps.ray_client import use_ray_token

        check_reachable(self.gcs_address)
        use_ray_token()
        client = GcsClient(self.gcs_address)
        if self._v2 is None:
            self._v2 = is_autoscaler_v2(fetch_from_server=True, gcs_client=client)
        if self._v2:
            from ray.autoscaler.v2.sdk import request_cluster_resources

            request_cluster_resources(self.gcs_address, [{"resources": b, "label_selector": {}} for b in bundles])
        else:  # the v1 monitor reads the ask from the GCS's key-value store
            client.internal_kv_put(RESOURCE_REQUEST_KEY, json.dumps(bundles).encode(), True, None)


def _key(bundles: list[dict[str, float]]) -> list[str]:
    return sorted(json.dumps(b, sort_keys=True) for b in bundles)

