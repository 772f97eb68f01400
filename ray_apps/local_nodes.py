"""The node provider `oppen up` gives Ray's autoscaler: Ray's fake multi-node provider (each worker
node a raylet on this machine), with two fixes that make its nodes behave like machines.

- Up to date once started. Ray's provider leaves every node tagged with the launch status
  `uninitialized` (it runs no node updaters), and the autoscaler's liveness check skips nodes that
  are not up to date: a node whose raylet died kept its slot forever. Tagged up to date, a dead
  node misses its heartbeats, is terminated, and the autoscaler starts another.
- Its servers on the head's address (a loopback head keeps its nodes on loopback).
- A temp dir of its own (`<head temp dir>/n<k>`). Sharing the head's, a node's runtime-env agent
  deleted a job's working dir as unused on its node when the job's workers ended there, while the
  job's driver on the head still ran in it.
"""

from __future__ import annotations

import copy
import json

import ray
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (NODE_KIND_WORKER, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME,
                                 TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)

class LocalNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray 2.60's FakeMultiNodeProvider._create_node_with_resources_and_labels, with a temp dir
        # per node and the node tagged up to date.
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            root = self.provider_config.get("node_temp_root")
            ray_params = ray._private.parameter.RayParams(
                min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None), resources=resources,
                labels=labels, redis_address=self._gcs_address, gcs_address=self._gcs_address,
                temp_dir=f"{root}/n{self._next_node_id}" if root else None,
                node_ip_address=self.provider_config.get("node_ip_address"),  # its servers listen there
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            self._nodes[next_id] = {
                "tags": {**tags, TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                         TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE},
                "node": node,
            }
