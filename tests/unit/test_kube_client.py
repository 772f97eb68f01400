"""ray_apps.kube against a thin fake Kubernetes API server on 127.0.0.1.

A fake, because no API server can run here (no Docker, no Kind). It is kept to what the client
touches: the custom-objects routes of group ray.io/v1, storing objects in a dict, answering
Kubernetes `Status` bodies for 404 and 409, and recording every request for the assertions.
"""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from ray_apps.kube import Conflict, KubeError, KubeRayClient, NoKubeconfig, NotFound, load_api_client

ROUTE = re.compile(r"^/apis/ray\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<plural>rayjobs|rayclusters|rayservices)"
                   r"(?:/(?P<name>[^/]+))?$")
TOKEN = "test-token-123"
MNIST_JOB = Path(__file__).resolve().parents[2] / "kuberay" / "ray-job.mnist.yaml"


class FakeApiServer:
    def __init__(self, operator_installed: bool = True):
        self.operator_installed = operator_installed  # False: no ray.io group, every path unknown
        self.objects: dict[tuple, dict] = {}
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code, reason, message):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code})

            def _handle(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                        "body": body, "auth": self.headers.get("Authorization")})
                m = ROUTE.match(url.path) if server.operator_installed else None
                if not m:
                    return self._status(404, "NotFound", "the server could not find the requested resource")
                ns, plural, name = m["ns"], m["plural"], m["name"]
                key = (ns, plural, name)
                if self.command == "POST" and name is None:
                    key = (ns, plural, body["metadata"]["name"])
                    if key in server.objects:
                        return self._status(409, "AlreadyExists",
                                            f'{plural}.ray.io "{key[2]}" already exists')
                    server.objects[key] = {**body, "metadata": {**body["metadata"], "namespace": ns, "uid": "u-1"}}
                    return self._send(201, server.objects[key])
                if self.command == "GET" and name is None:
                    selector = parse_qs(url.query).get("labelSelector", [None])[0]
                    items = [o for (n, p, _), o in server.objects.items() if n == ns and p == plural
                             and _matches(o, selector)]
                    return self._send(200, {"apiVersion": "ray.io/v1", "kind": "List", "items": items})
                if key not in server.objects:
                    return self._status(404, "NotFound", f'{plural}.ray.io "{name}" not found')
                if self.command == "GET":
                    return self._send(200, server.objects[key])
                if self.command == "DELETE":
                    server.objects.pop(key)
                    return self._send(200, {"kind": "Status", "status": "Success"})
                return self._status(405, "MethodNotAllowed", "not supported by the fake")

            do_GET = do_POST = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _matches(obj, selector):
    if not selector:
        return True
    labels = obj["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in (part.split("=") for part in selector.split(",")))


def _kubeconfig(tmp_path, server_url) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
        "users": [{"name": "fake", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    return path


@pytest.fixture
def api(tmp_path):
    with FakeApiServer() as fake:
        client = KubeRayClient(load_api_client(_kubeconfig(tmp_path, fake.url)), namespace="oppen")
        yield fake, client


def test_create_get_list_delete_a_rayjob_through_the_custom_objects_api(api):
    fake, client = api
    body = yaml.safe_load(MNIST_JOB.read_text())
    created = client.create_rayjob(body)
    assert created["metadata"]["uid"] == "u-1"
    post = fake.requests[-1]
    assert post["method"] == "POST" and post["path"] == "/apis/ray.io/v1/namespaces/oppen/rayjobs"
    assert post["body"]["spec"]["entrypoint"] == body["spec"]["entrypoint"]
    assert post["auth"] == f"Bearer {TOKEN}"  # the kubeconfig's credentials reach the server

    assert client.get_rayjob("mnist")["spec"]["clusterSelector"] == {"ray.io/cluster": "oppen"}
    assert fake.requests[-1]["path"] == "/apis/ray.io/v1/namespaces/oppen/rayjobs/mnist"

    assert [j["metadata"]["name"] for j in client.list_rayjobs("oppen/trainer=mnist")] == ["mnist"]
    assert fake.requests[-1]["query"]["labelSelector"] == ["oppen/trainer=mnist"]
    assert client.list_rayjobs("oppen/trainer=llm") == []

    client.delete_rayjob("mnist")
    delete = fake.requests[-1]
    assert delete["method"] == "DELETE" and delete["path"].endswith("/rayjobs/mnist")
    assert delete["query"]["propagationPolicy"] == ["Foreground"]
    assert client.list_rayjobs() == []


def test_rayclusters_use_their_own_resource_path(api):
    fake, client = api
    body = yaml.safe_load((MNIST_JOB.parent / "ray-cluster.kind.yaml").read_text())
    client.create_raycluster(body)
    assert fake.requests[-1]["path"] == "/apis/ray.io/v1/namespaces/oppen/rayclusters"
    groups = client.get_raycluster("oppen")["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu"}


def test_404_and_409_become_typed_errors_with_the_servers_message(api):
    fake, client = api
    with pytest.raises(NotFound, match=r'RayJob oppen/nope not found: rayjobs.ray.io "nope" not found') as info:
        client.get_rayjob("nope")
    assert info.value.api_status == 404
    with pytest.raises(NotFound):
        client.delete_raycluster("nope")

    body = yaml.safe_load(MNIST_JOB.read_text())
    client.create_rayjob(body)
    with pytest.raises(Conflict, match="already exists") as info:
        client.create_rayjob(body)
    assert info.value.status == 409


def test_a_cluster_without_the_operator_is_named_as_such(tmp_path):
    with FakeApiServer(operator_installed=False) as fake:
        client = KubeRayClient(load_api_client(_kubeconfig(tmp_path, fake.url)))
        with pytest.raises(NotFound, match="is the KubeRay operator installed"):
            client.list_rayclusters()


def test_bad_bodies_are_refused_before_any_request(api):
    fake, client = api
    with pytest.raises(ValueError, match="apiVersion ray.io/v1"):
        client.create({"apiVersion": "v1", "kind": "RayJob", "metadata": {"name": "x"}})
    with pytest.raises(ValueError, match="needs metadata.name"):
        client.create({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {}})
    with pytest.raises(ValueError, match="unknown KubeRay kind 'Pod'"):
        client.get("Pod", "x")
    assert fake.requests == []


def test_missing_kubeconfig_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(NoKubeconfig, match=r"no kubeconfig at .*absent.*KUBECONFIG"):
        load_api_client()


def test_an_unreachable_api_server_is_a_kube_error_not_a_traceback(tmp_path):
    with FakeApiServer() as fake:
        url = fake.url
    client = KubeRayClient(load_api_client(_kubeconfig(tmp_path, url)))  # the server is gone now
    client._api.api_client.configuration.retries = 0
    with pytest.raises(KubeError, match="cannot reach the Kubernetes API"):
        client.list_rayjobs()


def test_wait_rayjob_follows_the_status_to_the_end(api):
    fake, client = api
    body = yaml.safe_load(MNIST_JOB.read_text())
    client.create_rayjob(body)
    key = ("oppen", "rayjobs", "mnist")
    steps = iter([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                  {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    seen = []

    def advance(status):
        seen.append(status.get("jobDeploymentStatus"))
        fake.objects[key]["status"] = next(steps, fake.objects[key].get("status"))

    final = client.wait_rayjob("mnist", poll_s=0.01, timeout_s=10, on_status=advance)
    assert final["jobStatus"] == "SUCCEEDED" and seen == [None, "Running", "Complete"]


def test_oppen_kube_apply_list_delete_through_the_cli(tmp_path, capsys):
    from ray_apps.cli import main

    with FakeApiServer() as fake:
        conf = ["--kubeconfig", str(_kubeconfig(tmp_path, fake.url))]
        assert main(["kube", "apply", str(MNIST_JOB), *conf]) == 0
        assert main(["kube", "list", "rayjobs", "-l", "oppen/trainer=mnist", *conf]) == 0
        assert main(["kube", "delete", "rayjob", "mnist", *conf]) == 0
        assert main(["kube", "delete", "rayjob", "mnist", *conf]) == 2  # already gone: a clear error, exit 2
    out, err = capsys.readouterr()
    assert "created RayJob" in out and "mnist" in out and "deleted rayjob oppen/mnist" in out
    assert 'error: RayJob oppen/mnist not found' in err
    assert [r["method"] for r in fake.requests] == ["POST", "GET", "DELETE", "DELETE"]
