"""KubeRay's custom resources (RayJob, RayCluster, RayService) through the Kubernetes API.

The official `kubernetes` client's CustomObjectsApi, group `ray.io`, version `v1`: no `kubectl`
subprocesses. API failures arrive as typed errors (NotFound, Conflict) with the server's own
message; a missing kubeconfig is said plainly with the fix.

The platform itself needs none of this to use a KubeRay cluster: point RAY_ADDRESS at the head's
dashboard (port 8265, e.g. http://oppen-head-svc.oppen.svc:8265 in the cluster) and the queue's
dispatcher submits there like to any Ray. This module is for managing the clusters and RayJobs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from trainers import errors

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayCluster": "rayclusters", "RayService": "rayservices"}
DEFAULT_NAMESPACE = "oppen"
# RayJob.status.jobDeploymentStatus values after which nothing more happens.
RAYJOB_DONE = {"Complete", "Failed", "ValidationFailed"}


class KubeError(errors.Unavailable):
    """A Kubernetes API call failed; `api_status` is the HTTP status when the server answered."""

    def __init__(self, message: str, api_status: int | None = None):
        super().__init__(message)
        self.api_status = api_status


class NotFound(errors.NotFound, KubeError):
    pass


class Conflict(errors.Conflict, KubeError):
    pass


class NoKubeconfig(KubeError):
    pass


def _kind(kind: str) -> str:
    for known in PLURALS:
        if kind.lower() in (known.lower(), PLURALS[known]):
            return known
    raise ValueError(f"unknown KubeRay kind {kind!r}: use one of {', '.join(PLURALS)}")


def load_api_client(kubeconfig: str | os.PathLike | None = None, context: str | None = None):
    """An ApiClient from the kubeconfig ($KUBECONFIG, ~/.kube/config), or the in-cluster
    service account when running in a pod."""
    from kubernetes import config

    path = Path(kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config").expanduser()
    if kubeconfig is None and not path.exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        from kubernetes import client

        return client.ApiClient()
    if not path.exists():
        raise NoKubeconfig(f"no kubeconfig at {path}. To fix: create the cluster (kuberay/bring-up.sh, or "
                           "`kind create cluster`), or point KUBECONFIG at your cluster's kubeconfig.")
    try:
        return config.new_client_from_config(config_file=str(path), context=context)
    except config.ConfigException as exc:
        raise NoKubeconfig(f"kubeconfig {path} is not usable: {exc}") from exc


class KubeRayClient:
    """Create, read, list and delete KubeRay objects in one namespace."""

    def __init__(self, api_client=None, namespace: str = DEFAULT_NAMESPACE):
        from kubernetes import client

        self.namespace = namespace
        self._api = client.CustomObjectsApi(api_client or load_api_client())

    @property
    def host(self) -> str:
        return self._api.api_client.configuration.host

    def create(self, body: dict[str, Any]) -> dict:
        """Create the object `body` describes (its kind picks the resource; its namespace or ours)."""
        kind = _kind(body.get("kind", ""))
        if body.get("apiVersion") != f"{GROUP}/{VERSION}":
            raise ValueError(f"{kind} must have apiVersion {GROUP}/{VERSION}, got {body.get('apiVersion')!r}")
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise ValueError(f"{kind} needs metadata.name")
        ns = body["metadata"].get("namespace") or self.namespace
        return self._call(kind, name, lambda: self._api.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURALS[kind], body))

    def get(self, kind: str, name: str) -> dict:
        kind = _kind(kind)
        return self._call(kind, name, lambda: self._api.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], name))

    def list(self, kind: str, label_selector: str | None = None) -> list[dict]:
        kind = _kind(kind)
        kwargs = {"label_selector": label_selector} if label_selector else {}
        out = self._call(kind, None, lambda: self._api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], **kwargs))
        return out.get("items", [])

    def delete(self, kind: str, name: str) -> dict:
        """Delete with foreground propagation: a RayJob's own RayCluster and pods go with it."""
        kind = _kind(kind)
        return self._call(kind, name, lambda: self._api.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], name, propagation_policy="Foreground"))

    # RayJob and RayCluster shorthands, the objects the platform manages most.
    def create_rayjob(self, body: dict) -> dict:
        return self.create({**body, "kind": "RayJob"})

    def get_rayjob(self, name: str) -> dict:
        return self.get("RayJob", name)

    def list_rayjobs(self, label_selector: str | None = None) -> list[dict]:
        return self.list("RayJob", label_selector)

    def delete_rayjob(self, name: str) -> dict:
        return self.delete("RayJob", name)

    def create_raycluster(self, body: dict) -> dict:
        return self.create({**body, "kind": "RayCluster"})

    def get_raycluster(self, name: str) -> dict:
        return self.get("RayCluster", name)

    def list_rayclusters(self, label_selector: str | None = None) -> list[dict]:
        return self.list("RayCluster", label_selector)

    def delete_raycluster(self, name: str) -> dict:
        return self.delete("RayCluster", name)

    def wait_rayjob(self, name: str, *, timeout_s: float = 3600, poll_s: float = 5.0,
                    on_status: Callable[[dict], None] | None = None) -> dict:
        """Poll a RayJob until its deployment is Complete or Failed; its final status."""
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            status = self.get_rayjob(name).get("status") or {}
            seen = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
            if on_status and seen != last:
                on_status(status)
            last = seen
            if status.get("jobDeploymentStatus") in RAYJOB_DONE:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"RayJob {name} still {seen[0] or 'pending'} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def _call(self, kind: str, name: str | None, call: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        what = f"{kind} {self.namespace}/{name}" if name else f"{PLURALS[kind]} in {self.namespace}"
        try:
            return call()
        except ApiException as exc:
            message = _server_message(exc)
            if exc.status == 404:
                if "the server could not find the requested resource" in message.lower():
                    raise NotFound(f"{what}: the API server has no {GROUP}/{VERSION} {kind}: is the KubeRay "
                                   "operator installed? (terraform/ installs it)", 404) from None
                raise NotFound(f"{what} not found: {message}", 404) from None
            if exc.status == 409:
                raise Conflict(f"{what} already exists or changed meanwhile: {message}", 409) from None
            raise KubeError(f"{what}: {exc.status} {exc.reason}: {message}", exc.status) from None
        except HTTPError as exc:
            raise KubeError(f"{what}: cannot reach the Kubernetes API at {self.host}: {exc}") from None


def _server_message(exc) -> str:
    """The `message` of the Status object the API server sends with an error."""
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
