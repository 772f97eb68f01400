"""The node provider `oppen up` gives Ray's autoscaler: Ray's fake multi-node provider (each worker
node a raylet on this machine), with one fix.

Ray's provider tags every node it starts with the autoscaler's launch status, `uninitialized`, and
never moves it on (it runs no node updaters); the autoscaler's liveness check skips nodes that are
not up to date, so a node whose raylet died kept its slot forever and was never replaced. Here a
node is tagged up to date once its raylet is started, as an updater would: a dead node then misses
its heartbeats, is terminated, and the autoscaler starts another if the demand is still there.
"""

from __future__ import annotations

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import STATUS_UP_TO_DATE, TAG_RAY_NODE_STATUS

PROVIDER = f"{__name__}.LocalNodeProvider"  # for `provider: {type: external, module: ...}`


class LocalNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:
            before = set(self._nodes)
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            for node_id in set(self._nodes) - before:
                self._nodes[node_id]["tags"][TAG_RAY_NODE_STATUS] = STATUS_UP_TO_DATE
