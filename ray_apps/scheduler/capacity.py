"""What the cluster has and what it may grow to, read live from Ray for one decision.

The nodes and what they hold come from the GCS, which sees a job's resources freed within about a
second; the dashboard's cluster status, read for a remote single head that exposes only its
dashboard, is the autoscaler's report, refreshed every 5 s (a job waited up to that long for CPUs an
ended job had already given back). With worker groups, also for each group the nodes it may still
add up to the topology's maximum; a node asked for but not joined yet counts as addable, so a
request is never refused while its node starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_apps.autoscaler import GroupState, cluster_state
from ray_apps.config import Settings
from ray_apps.ray_client import PlatformError, Resources, cluster_resources
from ray_apps.topology import Topology, addable_nodes

Node = dict[str, float]


@dataclass
class Capacity:
    resources: Resources                                   # joined nodes: used and total per node
    addable: list[Node] = field(default_factory=list)      # empty nodes the autoscaler may still start
    groups: dict[str, GroupState] = field(default_factory=dict)

    def potential_nodes(self) -> list[Node]:
        """Every node's total at full scale: what the cluster could ever give one job."""
        return self.resources.node_totals() + self.addable


def read_capacity(settings: Settings, topology: Topology) -> Capacity:
    if not topology.autoscaling and not settings.is_local:
        return Capacity(cluster_resources(settings.dashboard_url))
    try:
        state = cluster_state(settings.gcs_address, topology)
    except Exception as exc:  # noqa: BLE001 - Ray's GCS client raises its own RPC errors
        raise PlatformError(f"Ray's GCS at {settings.gcs_address} does not answer ({exc}). "
                            "To fix: run `oppen up` or set RAY_ADDRESS (and ray.gcs_port).") from None
    res = Resources()
    for node in state.nodes:
        usage = {k: (total - node.available.get(k, 0.0), total) for k, total in node.total.items()}
        res.by_node[node.node_id] = usage
        for k, (used, total) in usage.items():
            res.used[k] = res.used.get(k, 0.0) + used
            res.total[k] = res.total.get(k, 0.0) + total
    return Capacity(res, addable_nodes(topology, state.joined_per_group()), state.groups)
