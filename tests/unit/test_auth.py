"""Per-user tokens with tenant and role (ray_apps/auth.py), and `oppen up` refusing an open platform."""

import json

import pytest

from ray_apps.auth import LOCAL_ADMIN, AuthError, Role, Users


def test_a_user_s_token_is_shown_once_and_kept_only_as_a_hash(tmp_path):
    users = Users(tmp_path / "users.json")
    token = users.add("ana", "team-a", Role.MEMBER)
    stored = (tmp_path / "users.json").read_text()
    assert token not in stored and json.loads(stored)["users"][0]["name"] == "ana"
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    caller = users.authenticate(f"Bearer {token}")
    assert (caller.user, caller.tenant, caller.role, caller.scope) == ("ana", "team-a", Role.MEMBER, "team-a")
    for bad in (None, "", "Bearer", f"Basic {token}", f"Bearer {token}x", "Bearer " + "a" * 10_000):
        with pytest.raises(AuthError) as err:
            users.authenticate(bad)
        assert err.value.status == 401
    with pytest.raises(ValueError, match="exists"):
        users.add("ana", "team-b", Role.ADMIN)
    with pytest.raises(ValueError, match="letters, digits"):
        users.add("ana b", "team-a", Role.MEMBER)


def test_a_removed_user_s_token_stops_working_without_a_restart(tmp_path):
    users = Users(tmp_path / "users.json")
    keep, gone = users.add("ana", "team-a", Role.ADMIN), users.add("bo", "team-b", Role.VIEWER)
    assert users.authenticate(f"Bearer {gone}").role is Role.VIEWER
    assert Users(tmp_path / "users.json").remove("bo")  # as `oppen users remove` does, in another process
    with pytest.raises(AuthError):
        users.authenticate(f"Bearer {gone}")
    assert users.authenticate(f"Bearer {keep}").scope is None  # an admin sees every tenant


def test_roles_are_ordered_and_a_lower_one_is_refused_with_a_403():
    users = Users(None, {"t-view": {"tenant": "team-a", "role": "viewer"}, "t-member": "team-a"})
    viewer, member = users.authenticate("Bearer t-view"), users.authenticate("Bearer t-member")
    assert member.role is Role.MEMBER and member.tenant == "team-a"
    member.require(Role.MEMBER, "submitting")
    with pytest.raises(AuthError, match="submitting needs the member role; team-a is viewer") as err:
        viewer.require(Role.MEMBER, "submitting")
    assert err.value.status == 403
    with pytest.raises(AuthError, match="needs the admin role"):
        member.require(Role.ADMIN, "changing the served version")


def test_without_any_token_every_caller_is_the_local_admin(tmp_path):
    users = Users(tmp_path / "users.json")
    assert not users.configured and users.authenticate(None) is LOCAL_ADMIN


def test_up_refuses_a_public_host_without_tokens_and_starts_nothing(tmp_path, monkeypatch):
    from ray_apps import cluster
    from ray_apps.cluster import PlatformError
    from ray_apps.config import Settings

    monkeypatch.delenv("OPPEN_TENANT_TOKENS", raising=False)  # the integration platform's, in one session

    def no_start(*args, **kwargs):  # were the check to let it through, nothing may start on real ports
        raise AssertionError("oppen up started a service")

    monkeypatch.setattr(cluster, "spawn", no_start)
    settings = Settings(host="0.0.0.0", data_dir=tmp_path / "data")
    with pytest.raises(PlatformError, match="no tokens would open the platform's APIs to anyone"):
        cluster.up(settings, say=lambda _: None)
    assert not (tmp_path / "data").exists()
    # With a user, the check passes (a later step may still fail here: nothing below is started).
    Users.from_settings(settings).add("ops", "ops", Role.ADMIN)
    cluster.check_not_open(settings)


def test_the_body_limit_counts_bytes_read_so_a_chunked_body_cannot_pass():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from ray_apps.serve.http_common import limit_body_size

    app, parsed = FastAPI(), []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        parsed.append(len(await request.body()))
        return {"bytes": parsed[-1]}

    limit_body_size(app, max_bytes=1000)
    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    assert client.post("/echo", content=iter([b"x" * 600, b"x" * 400])).json() == {"bytes": 1000}  # chunked
    # Chunked, no Content-Length: refused by what was read (the real server stops reading there,
    # tests/integration/test_rest_api.py; this in-memory client sends it all first).
    refused = client.post("/echo", content=iter([b"x" * 500] * 200))
    assert refused.status_code == 413 and refused.json()["detail"]["field"] == "body"
    assert client.post("/echo", content=b"x" * 1001).status_code == 413
    assert parsed == [1000, 1000]  # the app never saw an oversized body


def test_a_loopback_platform_refuses_a_request_naming_another_host():
    """DNS rebinding: a page at evil.example rebound to 127.0.0.1 still sends Host: evil.example."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ray_apps.serve.http_common import loopback_hosts_only

    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    loopback_hosts_only(app, "127.0.0.1")
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    assert client.get("/ping").status_code == 200
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert client.get("/ping", headers={"Host": host}).status_code == 200, host
    refused = client.get("/ping", headers={"Host": "evil.example:8000"})
    assert refused.status_code == 421 and refused.json()["detail"]["field"] == "Host"
    public = FastAPI()
    public.get("/ping")(lambda: {"ok": True})
    loopback_hosts_only(public, "0.0.0.0")  # reached by its own names: no check
    assert TestClient(public).get("/ping", headers={"Host": "oppen.example"}).status_code == 200
