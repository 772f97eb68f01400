"""The queue's REST API on Ray Serve, over real HTTP (tenant tokens configured)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from ray_apps import cli
from ray_apps.agent.tools import PlatformTools
from ray_apps.cluster import serve_url
from ray_apps.scheduler.api import Queue
from trainers.errors import OppenError

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}
ADMIN = {"Authorization": "Bearer token-admin"}
VIEWER = {"Authorization": "Bearer token-view"}


@pytest.fixture()
def api(platform):
    return serve_url(platform) + "/v1"


def test_openapi_describes_the_jobs_api(api):
    spec = requests.get(api.removesuffix("/v1") + "/openapi.json", headers=VIEWER, timeout=10).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/gpus"} <= set(spec["paths"])


@pytest.mark.parametrize("body,status,field,reason", [
    ({}, 422, "trainer", "Field required"),
    ({"trainer": "resnet"}, 422, "trainer", "unknown trainer 'resnet'"),
    ({"trainer": "probe", "params": {"seconds": -1}}, 422, "params.seconds", "--seconds must be in [0, 86400]"),
    ({"trainer": "probe", "params": {"secs": 1}}, 422, "params.secs", "unknown parameter(s) for probe: secs"),
    ({"trainer": "probe", "priority": "urgent"}, 422, "priority", "unknown priority 'urgent'"),
    ({"trainer": "probe", "colour": "red"}, 422, "colour", "Extra inputs are not permitted"),
    ({"trainer": "probe", "params": {"gpus_per_worker": 5}}, 422, "params", "asks for 5 GPU"),
    # Typed before anything is stored: a newline would split Ray's shell command line.
    ({"trainer": "mnist", "params": {"epochs": "1\n"}}, 422, "params.epochs", "--epochs must be a whole number"),
    ({"trainer": "mnist", "params": {"epochs": 1.0}}, 422, "params.epochs", "--epochs must be a whole number"),
    ({"trainer": "mnist", "params": {"epochs": True}}, 422, "params.epochs", "--epochs must be a whole number"),
    ({"trainer": "mnist", "params": {"cpus_per_worker": 0.02}}, 422, "params.cpus_per_worker", "--cpus-per-worker must be at least 1"),
    # A search: bounded by its schema, then checked as trainers.tune will run it.
    ({"trainer": "mnist", "search": {"num_samples": 0}}, 422, "search.num_samples", "greater than or equal to 1"),
    ({"trainer": "mnist", "search": {"trials": 3}}, 422, "search.trials", "Extra inputs are not permitted"),
    ({"trainer": "mnist", "search": {"space": ["depth=choice:1,2"]}}, 422, "search", "mnist has no parameter 'depth'"),
    ({"trainer": "probe", "search": {}}, 422, "trainer", "probe cannot be searched"),
])
def test_bad_bodies_are_4xx_naming_field_and_reason(api, body, status, field, reason):
    resp = requests.post(f"{api}/jobs", json=body, headers=A, timeout=30)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]  # one shape, FastAPI's own validation included
    assert set(detail) == {"kind", "field", "reason"} and detail["kind"] in ("refused", "infeasible"), detail
    assert detail["field"] == field and reason in detail["reason"], detail


def test_auth_and_tenancy(api):
    assert requests.get(f"{api}/jobs", timeout=10).status_code == 401
    assert requests.get(f"{api}/jobs", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    resp = requests.post(f"{api}/jobs", json={"trainer": "probe", "params": {"seconds": 1}, "tenant": "team-b"},
                         headers=A, timeout=30)
    assert resp.status_code == 403 and resp.json()["detail"]["field"] == "tenant"

    created = requests.post(f"{api}/jobs", json={"trainer": "probe", "params": {"seconds": 1}},
                            headers=A, timeout=30)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["tenant"] == "team-a" and job["state"] == "QUEUED"
    assert requests.get(f"{api}/jobs/{job['id']}", headers=B, timeout=10).status_code == 404  # not yours
    assert requests.delete(f"{api}/jobs/{job['id']}", headers=B, timeout=10).status_code == 404
    assert all(j["tenant"] == "team-b" for j in requests.get(f"{api}/jobs", headers=B, timeout=10).json())
    assert job["id"] in [j["id"] for j in requests.get(f"{api}/jobs", headers=A, timeout=10).json()]

    deadline = time.monotonic() + 120
    while (detail := requests.get(f"{api}/jobs/{job['id']}", headers=A, timeout=10).json())["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline, detail
        time.sleep(0.5)
    assert [e["to_state"] for e in detail["events"]] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    again = requests.delete(f"{api}/jobs/{job['id']}", headers=A, timeout=10)
    assert again.status_code == 409 and "already SUCCEEDED" in again.json()["detail"]["reason"]


def test_unknown_id_oversized_body_and_gpus(api):
    assert requests.get(f"{api}/jobs/nope", headers=A, timeout=10).status_code == 404
    big = {"trainer": "probe", "params": {"x" * 10: "y" * 100_000}}
    assert requests.post(f"{api}/jobs", json=big, headers=A, timeout=10).status_code == 413
    gpus = requests.get(f"{api}/gpus", headers=A, timeout=10).json()
    assert gpus["total"] == 2 and 0 <= gpus["free"] <= 2 and "queued_demand" in gpus


def test_every_data_route_and_the_docs_need_a_token_and_roles_limit_what_it_may_do(api, platform):
    root = api.removesuffix("/v1")
    for path in ("/v1/agent/health", "/v1/models/health"):  # on-demand ingresses: started, not timed here
        assert requests.get(root + path, timeout=120).status_code == 200, path
    for path in ("/docs", "/openapi.json", "/v1/status", "/v1/costs/report", "/v1/models/", "/v1/models",
                 "/v1/agent/docs", "/v1/models/openapi.json"):
        resp = requests.get(root + path, timeout=10)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer", (path, resp.status_code)
    for path in ("/v1/health", "/v1/agent/health", "/v1/models/health", "/status"):
        assert requests.get(root + path, timeout=10).status_code == 200, path
    assert requests.get(root + "/docs", headers=VIEWER, timeout=10).status_code == 200
    # A viewer reads its tenant's jobs but may not submit; a member may not change what everyone is served.
    assert requests.get(f"{api}/jobs", headers=VIEWER, timeout=10).status_code == 200
    refused = requests.post(f"{api}/jobs", json={"trainer": "probe"}, headers=VIEWER, timeout=10)
    assert refused.status_code == 403 and "needs the member role" in refused.json()["detail"]["reason"]
    moved = requests.post(f"{root}/v1/models/mnist/serve", json={"alias": "champion"}, headers=A, timeout=10)
    assert moved.status_code == 403 and "needs the admin role" in moved.json()["detail"]["reason"], moved.text
    # An admin sees every tenant's jobs and may submit for one.
    job = requests.post(f"{api}/jobs", json={"trainer": "probe", "params": {"seconds": 0}, "tenant": "team-b"},
                        headers=ADMIN, timeout=30).json()
    assert job["tenant"] == "team-b"
    assert job["id"] in [j["id"] for j in requests.get(f"{api}/jobs", headers=ADMIN, timeout=10).json()]
    assert job["id"] not in [j["id"] for j in requests.get(f"{api}/jobs", headers=A, timeout=10).json()]


def test_a_chunked_oversized_body_is_refused_before_parsing_while_the_api_keeps_answering(api, platform):
    """The limit counts the bytes read, so a body with no Content-Length cannot make the replica read
    and parse megabytes: the 413 comes while the client is still sending, and other requests are
    answered meanwhile. (A raw socket: the client must see the answer while it sends.)"""
    import select
    import socket

    sock = socket.create_connection((platform.host, platform.serve_port), timeout=10)
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer token-a\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk, sent = b"y" * 50_000, 0
    try:
        while sent < 20_000_000 and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if sent == 1_000_000:  # meanwhile, the API answers others
                assert requests.get(f"{api}/jobs", headers=A, timeout=10).status_code == 200
    except OSError:  # the server closed while we still sent: its answer is in the receive buffer
        pass
    status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    sock.close()
    assert b" 413 " in status_line, status_line
    assert sent < 20_000_000, "the whole body was read before the answer"
    print(f"413 after {sent / 1e6:.1f} MB of a 20 MB chunked body")
    assert requests.get(f"{api}/jobs", headers=A, timeout=10).status_code == 200


def test_a_retried_submit_with_its_key_returns_the_first_job_and_a_flood_gets_429(api):
    body = {"trainer": "probe", "params": {"seconds": 0}}
    key = {**A, "Idempotency-Key": f"retry-{time.time()}"}
    first = requests.post(f"{api}/jobs", json=body, headers=key, timeout=30)
    again = requests.post(f"{api}/jobs", json=body, headers=key, timeout=30)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    other = requests.post(f"{api}/jobs", json={**body, "params": {"seconds": 1}}, headers=key, timeout=30)
    assert other.status_code == 409 and other.json()["detail"]["field"] == "Idempotency-Key"
    # Newest first, paged by the last id seen.
    page = requests.get(f"{api}/jobs", params={"limit": 1}, headers=A, timeout=10)
    assert page.json()[0]["id"] == first.json()["id"] and page.headers["X-Next-After"] == first.json()["id"]
    older = requests.get(f"{api}/jobs", params={"limit": 1, "after": first.json()["id"]}, headers=A, timeout=10)
    assert older.json()[0]["submitted_at"] <= first.json()["submitted_at"] and older.json()[0]["id"] != first.json()["id"]
    # 60 a minute per tenant (the test platform's limit): never-fitting requests, so nothing runs.
    flood = {"trainer": "probe", "params": {"gpus_per_worker": 64}, "tenant": "team-flood"}
    answers = [requests.post(f"{api}/jobs", json=flood, headers=ADMIN, timeout=30) for _ in range(61)]
    assert [a.status_code for a in answers[:60]] == [422] * 60
    assert answers[60].status_code == 429 and 1 <= int(answers[60].headers["Retry-After"]) <= 60


def test_one_refusal_reads_the_same_on_every_front_end(api, platform, capsys):
    """REST, the agent's tools (what the HTTP agent and MCP call) and the CLI refuse the same bad
    parameter with the same kind, field and status."""
    body = {"trainer": "mnist", "params": {"epochs": 0}}
    rest = requests.post(f"{api}/jobs", json=body, headers=A, timeout=30)
    assert rest.status_code == 422, rest.text
    assert rest.json()["detail"]["kind"] == "refused" and rest.json()["detail"]["field"] == "params.epochs"

    with pytest.raises(OppenError) as err:
        PlatformTools(platform, "team-a", admin=False).call("queue_training_job", body)
    assert (err.value.status, err.value.kind, err.value.field) == (422, "refused", "params.epochs")

    assert cli.main(["queue", "submit", "mnist", "--epochs", "0"]) == 2
    assert "[refused: params.epochs]" in capsys.readouterr().err
    assert not [j for j in Queue.from_settings(platform).list() if j.params.get("epochs") == 0]


def test_a_submit_is_in_the_audit_log_for_its_tenant_and_admins_only(api):
    created = requests.post(f"{api}/jobs", json={"trainer": "probe", "params": {"seconds": 0}}, headers=A, timeout=30)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    def submits(headers, **params):
        resp = requests.get(f"{api}/audit", params={"since": "1h", **params}, headers=headers, timeout=30)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson"), resp.text
        lines = [json.loads(line) for line in resp.text.splitlines()]
        return lines, [r for r in lines if r["action"] == "job.submit" and r["target"] == job_id]

    mine, (rec,) = submits(A)
    assert (rec["user"], rec["tenant"], rec["front_end"], rec["source"], rec["outcome"]) == (
        "team-a", "team-a", "rest", "127.0.0.1", "ok")
    assert rec["params"]["trainer"] == "probe" and all(r["tenant"] == "team-a" for r in mine)
    theirs, none = submits(B)
    assert none == [] and all(r["tenant"] == "team-b" for r in theirs)
    assert len(submits(ADMIN)[1]) == 1 and len(submits(ADMIN, tenant="team-a")[1]) == 1
    assert requests.get(f"{api}/audit", params={"tenant": "team-a"}, headers=B, timeout=10).status_code == 403


def test_why_a_job_waits_over_rest_and_from_the_agent_and_only_admins_override_budgets(api, platform):
    """Two 2-GPU probes of team-a: the second waits on its tenant's quota (2 GPUs). The dispatcher's
    reason, the job's place in its class and the override's roles, over real HTTP."""
    first, second = (requests.post(f"{api}/jobs", json={"trainer": "probe", "params": {
        "seconds": 15, "gpus_per_worker": 2}, "priority": "low"}, headers=A, timeout=30).json() for _ in range(2))
    # Until the first one holds the GPUs, the second may wait on something else (capacity, or GPUs a
    # job of an earlier test still holds while Ray stops it): once it does, the reason is the quota.
    deadline = time.monotonic() + 90
    while (why := requests.get(f"{api}/jobs/{second['id']}/why", headers=A, timeout=10).json())["kind"] != "quota":
        assert time.monotonic() < deadline and why["state"] == "QUEUED", why
        time.sleep(0.5)
    assert why["state"] == "QUEUED" and why["kind"] == "quota" and "team-a" in why["reason"], why
    assert why["position"] >= 1 and why["of"] >= why["position"] and why["as_of"] > 0
    assert requests.get(f"{api}/jobs/{second['id']}/why", headers=B, timeout=10).status_code == 404  # not yours
    assert requests.get(f"{api}/jobs/{first['id']}/why", headers=A, timeout=10).json()["kind"] in (
        "starting", "running")
    reply = requests.post(api + "/agent", json={"message": "why is my job still waiting?"}, headers=A,
                          timeout=60).json()
    assert [c["name"] for c in reply["tool_calls"]] == ["why_is_job_waiting"], reply
    assert second["id"] in reply["answer"] and "quota" in reply["answer"], reply["answer"]
    refused = requests.post(f"{api}/jobs/{second['id']}/budget-override", headers=A, timeout=10)
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]["reason"]
    allowed = requests.post(f"{api}/jobs/{second['id']}/budget-override", headers=ADMIN, timeout=10)
    assert allowed.status_code in (200, 409), allowed.text  # 409: admitted meanwhile
    for job in (first, second):
        requests.delete(f"{api}/jobs/{job['id']}", headers=A, timeout=10)
