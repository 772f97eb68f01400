"""The queue's REST API on Ray Serve, over real HTTP (tenant tokens configured)."""

from __future__ import annotations

import time

import pytest
import requests

from ray_apps.cluster import serve_url

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}


@pytest.fixture()
def api(platform):
    return serve_url(platform) + "/v1"


def test_openapi_describes_the_jobs_api(api):
    spec = requests.get(api.removesuffix("/v1") + "/openapi.json", timeout=10).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/gpus"} <= set(spec["paths"])


@pytest.mark.parametrize("body,status,field,reason", [
    ({}, 422, "trainer", "Field required"),
    ({"trainer": "resnet"}, 422, "trainer", "unknown trainer 'resnet'"),
    ({"trainer": "probe", "params": {"seconds": -1}}, 422, "params", "--seconds must be in [0, 86400]"),
    ({"trainer": "probe", "params": {"secs": 1}}, 422, "params", "unknown parameter(s) for probe: secs"),
    ({"trainer": "probe", "priority": "urgent"}, 422, "priority", "unknown priority 'urgent'"),
    ({"trainer": "probe", "colour": "red"}, 422, "colour", "Extra inputs are not permitted"),
    ({"trainer": "probe", "params": {"gpus_per_worker": 5}}, 422, "params", "asks for 5 GPU"),
])
def test_bad_bodies_are_4xx_naming_field_and_reason(api, body, status, field, reason):
    resp = requests.post(f"{api}/jobs", json=body, headers=A, timeout=30)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    if isinstance(detail, list):  # FastAPI's own validation errors: one entry per field
        assert any(field in map(str, d["loc"]) and reason in d["msg"] for d in detail), detail
    else:
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
