"""The audit log on a real SQLite file, without Ray: one record per mutating call from every
front-end (Python API, CLI, agent, MCP, the dispatcher), refusals with their reason, secrets
redacted, tampering found by `verify`, export round trips and tenant scoping."""

from __future__ import annotations

import getpass
import json
import multiprocessing
import sqlite3
from types import SimpleNamespace

import pytest
import yaml

from ray_apps import cli
from ray_apps.agent.tools import REQUEST_ACTOR, PlatformTools
from ray_apps.audit import REDACTED, SYSTEM, Actor, AuditLog
from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from trainers.errors import Conflict, Infeasible, NotFound, OppenError

NODES = [{"CPU": 16.0, "GPU": 0.0}]
ANA = Actor("ana", "team-a", "rest", "10.0.0.7")


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setattr(Queue, "max_nodes", lambda self: NODES)
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture()
def queue(settings):
    return Queue.from_settings(settings, QueueConfig())


def records(log: AuditLog, **match) -> list[dict]:
    return [r for r in log.export() if all(r[k] == v for k, v in match.items())]


def db_path(settings) -> str:
    return str(settings.data_dir / "queue.db")


# ---------------------------------------------------------------- the queue's API


def test_submit_and_cancel_are_one_record_each_with_the_actor_and_the_job(queue):
    job = queue.submit("mnist", {"epochs": 1}, tenant="team-a", actor=ANA, idempotency_key="k1")
    queue.cancel(job.id, tenant="team-a", actor=ANA)
    submit, cancel = queue.audit.export()
    assert submit["seq"] == 1 and cancel["seq"] == 2 and cancel["prev_hash"] == submit["hash"]
    assert {k: submit[k] for k in ("user", "tenant", "front_end", "source", "action", "target", "outcome", "reason")} \
        == {"user": "ana", "tenant": "team-a", "front_end": "rest", "source": "10.0.0.7", "action": "job.submit",
            "target": job.id, "outcome": "ok", "reason": ""}
    assert submit["params"] == {"trainer": "mnist", "params": {"epochs": 1}, "priority": None,
                                "idempotency_key": "k1"}
    assert (cancel["action"], cancel["target"], cancel["outcome"], cancel["user"]) == ("job.cancel", job.id, "ok", "ana")
    # Reads write nothing; the per-job events are kept as before.
    queue.get(job.id)
    queue.list()
    assert len(queue.audit.export()) == 2
    assert [e.to_state for e in queue.store.events(job.id)] == ["QUEUED", "CANCELLED"]


def test_refusals_are_recorded_with_their_reason(queue):
    with pytest.raises(OppenError, match="unknown priority"):
        queue.submit("mnist", {"epochs": 1}, priority="urgent", tenant="team-a", actor=ANA)
    with pytest.raises(Infeasible) as never:  # stored REJECTED: the record names that job
        queue.submit("mnist", {"epochs": 1, "num_workers": 64}, tenant="team-a", actor=ANA)
    with pytest.raises(NotFound):
        queue.cancel("mnist-nope", tenant="team-a", actor=ANA)
    job = queue.submit("mnist", {"epochs": 1}, tenant="team-a", actor=ANA)
    queue.cancel(job.id, actor=ANA)
    with pytest.raises(Conflict):
        queue.cancel(job.id, actor=ANA)
    bad_priority, rejected, unknown, _, _, again = queue.audit.export()
    assert bad_priority["outcome"] == "refused" and "unknown priority 'urgent'" in bad_priority["reason"]
    assert bad_priority["target"] is None and bad_priority["tenant"] == "team-a"
    rejected_id = queue.list(states=[JobState.REJECTED])[0].id
    assert rejected["target"] == rejected_id and rejected["outcome"] == "refused"
    assert rejected["reason"] == str(never.value)
    assert (unknown["action"], unknown["target"], unknown["reason"]) == ("job.cancel", "mnist-nope",
                                                                          "no job 'mnist-nope'")
    assert again["outcome"] == "refused" and "already CANCELLED" in again["reason"]


def test_a_call_without_an_actor_is_recorded_as_this_process_s_user(queue):
    job = queue.submit("mnist", {"epochs": 1})
    (rec,) = queue.audit.export()
    assert (rec["user"], rec["front_end"], rec["tenant"], rec["target"]) == (getpass.getuser(), "api", "default",
                                                                            job.id)


def test_secrets_are_redacted_wherever_they_are_nested(queue):
    queue.audit.record(ANA, "job.submit", "x", {"token": "t0ps3cret", "lr": 0.1, "headers": {
        "Authorization": "Bearer s3cret-bearer"}, "items": [{"db_password": "hunter2"}, {"api_key": "k-123"}],
        "client_secret": "cs"})
    (rec,) = queue.audit.export()
    assert rec["params"] == {"token": REDACTED, "lr": 0.1, "headers": {"Authorization": REDACTED},
                             "items": [{"db_password": REDACTED}, {"api_key": REDACTED}], "client_secret": REDACTED}
    raw = sqlite3.connect(db_path(queue.settings)).execute("SELECT params FROM audit_log").fetchone()[0]
    assert not any(s in raw for s in ("t0ps3cret", "s3cret-bearer", "hunter2", "k-123"))


def test_reads_are_recorded_only_when_the_setting_asks(settings):
    assert Settings(data_dir=settings.data_dir).audit.reads is False
    off = Queue.from_settings(settings, QueueConfig())
    off.audit.record_read(ANA, "job.list")
    assert off.audit.export() == []
    on = Queue.from_settings(Settings(data_dir=settings.data_dir, audit={"reads": True}), QueueConfig())
    on.audit.record_read(ANA, "job.list", params={"limit": "5"})
    assert [(r["action"], r["params"]) for r in on.audit.export()] == [("job.list", {"limit": "5"})]


def test_the_rest_read_routes_audit_reads_when_the_setting_asks(settings, monkeypatch):
    from ray_apps.auth import Users
    from ray_apps.serve import platform_api

    monkeypatch.setattr(platform_api, "settings_users", lambda: Users(None))  # no tokens: the local admin
    scope_of = platform_api.PlatformAPI.func_or_class._tenant  # what every read route calls first
    request = SimpleNamespace(client=SimpleNamespace(host="10.1.2.3"), query_params={"limit": "5"})
    for reads in (False, True):
        api = SimpleNamespace(queue=Queue.from_settings(Settings(data_dir=settings.data_dir, audit={"reads": reads}),
                                                        QueueConfig()))
        assert scope_of(api, None, request, "job.list") is None
    (rec,) = api.queue.audit.export()
    assert (rec["action"], rec["user"], rec["front_end"], rec["source"]) == ("job.list", "local", "rest", "10.1.2.3")


# ---------------------------------------------------------------- the CLI


@pytest.fixture()
def config(settings, tmp_path):
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(settings.data_dir)}))
    return str(path)


def test_cli_queue_submit_cancel_and_users_add_remove_are_one_record_each(config, settings, capsys):
    assert cli.main(["--config", config, "queue", "submit", "mnist", "--epochs", "1", "--tenant", "team-a"]) == 0
    job_id = capsys.readouterr().out.split()[1]
    assert cli.main(["--config", config, "queue", "cancel", job_id]) == 0
    assert cli.main(["--config", config, "users", "add", "bo", "--tenant", "team-b", "--role", "viewer"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["--config", config, "users", "add", "bo", "--tenant", "team-b"])
    assert cli.main(["--config", config, "users", "remove", "bo"]) == 0
    recs = AuditLog.from_settings(settings).export()
    me = getpass.getuser()
    assert [(r["action"], r["target"], r["tenant"], r["outcome"]) for r in recs] == [
        ("job.submit", job_id, "team-a", "ok"), ("job.cancel", job_id, "team-a", "ok"),
        ("user.add", "bo", "team-b", "ok"), ("user.add", "bo", "team-b", "refused"),
        ("user.remove", "bo", "team-b", "ok")]
    assert all(r["user"] == me and r["front_end"] == "cli" and r["source"] is None for r in recs)
    assert recs[2]["params"] == {"name": "bo", "tenant": "team-b", "role": "viewer"}
    assert "remove it first" in recs[3]["reason"]
    assert token not in (settings.data_dir / "queue.db").read_bytes().decode("latin-1")


def test_cli_export_round_trips_and_scopes_by_tenant_and_time(config, queue, capsys):
    queue.submit("mnist", {"epochs": 1}, tenant="team-a", actor=ANA)
    queue.submit("mnist", {"epochs": 2}, tenant="team-b", actor=Actor("bo", "team-b", "cli"))
    queue.audit.record(SYSTEM, "job.preempt", "x", {"token": "s"}, tenant="team-a", reason="preempted")
    assert cli.main(["--config", config, "audit", "export"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == queue.audit.export() and len(lines) == 3
    assert cli.main(["--config", config, "audit", "export", "--tenant", "team-a", "--since", "1h"]) == 0
    mine = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["user"], r["action"]) for r in mine] == [("ana", "job.submit"), ("system", "job.preempt")]
    assert cli.main(["--config", config, "audit", "export", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["--config", config, "audit", "export", "--since", "soon"]) == 2


def test_a_tenant_reads_only_its_own_records(queue):
    queue.submit("mnist", {"epochs": 1}, tenant="team-a", actor=ANA)
    queue.submit("mnist", {"epochs": 1}, tenant="team-b", actor=Actor("bo", "team-b", "rest"))
    # An admin acting for team-b: the record is team-b's, whoever the actor.
    queue.submit("mnist", {"epochs": 1}, tenant="team-b", actor=Actor("root", "ops", "rest"))
    assert [r["user"] for r in queue.audit.export(tenant="team-a")] == ["ana"]
    assert [r["user"] for r in queue.audit.export(tenant="team-b")] == ["bo", "root"]
    assert queue.audit.export(tenant="team-c") == [] and len(queue.audit.export()) == 3


# ---------------------------------------------------------------- tampering


def chain_of(queue, n: int = 5) -> list[dict]:
    for i in range(n):
        queue.audit.record(ANA, "job.submit", f"job-{i}", {"epochs": i})
    assert queue.audit.verify().ok
    return queue.audit.export()


def test_verify_passes_an_intact_chain_and_the_cli_says_so(config, queue, capsys):
    recs = chain_of(queue)
    result = queue.audit.verify()
    assert (result.ok, result.records, result.head_hash) == (True, 5, recs[-1]["hash"])
    assert cli.main(["--config", config, "audit", "verify"]) == 0
    assert "ok: 5 record(s)" in capsys.readouterr().out


def test_an_edited_record_is_named(config, queue, capsys):
    chain_of(queue)
    with sqlite3.connect(db_path(queue.settings)) as db:
        db.execute("UPDATE audit_log SET user = 'mallory' WHERE seq = 3")
    result = queue.audit.verify()
    assert (result.ok, result.bad_seq, result.records) == (False, 3, 2) and "changed" in result.reason
    assert cli.main(["--config", config, "audit", "verify"]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().err


def test_an_edited_record_with_its_hash_rewritten_breaks_the_next_link(queue):
    from ray_apps.audit import record_hash

    recs = chain_of(queue)
    forged = {**recs[2], "user": "mallory", "params": json.dumps(recs[2]["params"], sort_keys=True,
                                                                 separators=(",", ":"))}
    with sqlite3.connect(db_path(queue.settings)) as db:
        db.execute("UPDATE audit_log SET user = 'mallory', hash = ? WHERE seq = 3", (record_hash(forged),))
    result = queue.audit.verify()
    assert (result.ok, result.bad_seq) == (False, 4) and "does not follow record 3" in result.reason


def test_a_deleted_record_is_named(queue):
    chain_of(queue)
    with sqlite3.connect(db_path(queue.settings)) as db:
        db.execute("DELETE FROM audit_log WHERE seq = 2")
    result = queue.audit.verify()
    assert (result.ok, result.bad_seq) == (False, 3) and "2 before it were removed" in result.reason


def test_two_swapped_records_are_named(queue):
    chain_of(queue)
    with sqlite3.connect(db_path(queue.settings)) as db:  # seq numbers exchanged: the rows trade places
        db.execute("UPDATE audit_log SET seq = -2 WHERE seq = 2")
        db.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
        db.execute("UPDATE audit_log SET seq = 3 WHERE seq = -2")
    result = queue.audit.verify()
    assert (result.ok, result.bad_seq) == (False, 2) and "reordered" in result.reason


def test_two_records_with_swapped_contents_are_named(queue):
    chain_of(queue)
    cols = "at, user, tenant, front_end, source, action, target, params, outcome, reason, prev_hash, hash"
    with sqlite3.connect(db_path(queue.settings)) as db:
        two, four = (db.execute(f"SELECT {cols} FROM audit_log WHERE seq = ?", (s,)).fetchone() for s in (2, 4))
        sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
        db.execute(f"UPDATE audit_log SET {sets} WHERE seq = 2", four)
        db.execute(f"UPDATE audit_log SET {sets} WHERE seq = 4", two)
    result = queue.audit.verify()
    assert (result.ok, result.bad_seq) == (False, 2)


def _append_many(url: str, who: str, n: int) -> None:
    from ray_apps.scheduler.store import make_engine

    log = AuditLog(make_engine(url))
    for i in range(n):
        log.record(Actor(who, "team-a", "rest"), "job.submit", f"{who}-{i}")


def test_writers_in_several_processes_keep_one_chain(queue):
    url = f"sqlite:///{db_path(queue.settings)}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(url, f"w{i}", 25)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    result = queue.audit.verify()
    assert result.ok and result.records == 100
    assert [r["seq"] for r in queue.audit.export()] == list(range(1, 101))


# ---------------------------------------------------------------- the agent, MCP and serving


def test_agent_and_mcp_tool_calls_are_recorded_with_their_front_end(settings, queue):
    agent = PlatformTools(settings, "team-a", queue=queue, admin=False)
    job = agent.queue_training_job("mnist", {"epochs": 1})
    mcp = PlatformTools(settings, "team-a", queue=queue, admin=False, front_end="mcp")
    mcp.cancel_job(job["id"])
    assert agent.for_caller("team-a", False).front_end == "agent"
    assert mcp.for_caller("team-a", False).front_end == "mcp"
    submit, cancel = queue.audit.export()
    me = getpass.getuser()
    assert (submit["action"], submit["front_end"], submit["user"], submit["tenant"], submit["target"]) == (
        "job.submit", "agent", me, "team-a", job["id"])
    assert (cancel["action"], cancel["front_end"], cancel["user"], cancel["target"]) == ("job.cancel", "mcp", me,
                                                                                         job["id"])


def test_the_mcp_server_acts_as_mcp(settings, monkeypatch):
    from ray_apps.agent import mcp_server

    built = []
    monkeypatch.setattr(mcp_server, "build_server", lambda tools: built.append(tools) or SimpleNamespace(
        run=lambda transport: None))
    mcp_server.main(settings, tenant="team-a")
    assert built[0].front_end == "mcp" and built[0].tenant == "team-a"


def test_the_agent_over_http_records_its_caller_and_address(settings, queue):
    from fastapi.testclient import TestClient

    from ray_apps.agent import http
    from ray_apps.agent.graph import Agent

    saved = dict(http._state)
    http.configure(Agent(PlatformTools(settings, queue=queue)), settings)
    try:
        reply = TestClient(http.app, base_url="http://127.0.0.1").post(
            "/", json={"message": "train mnist for 1 epoch"}).json()
    finally:
        http._state.update(saved)
    assert reply["tool_calls"][0]["name"] in ("queue_training_job", "trigger_training_job")
    (rec,) = queue.audit.export()
    assert (rec["action"], rec["user"], rec["front_end"], rec["source"]) == ("job.submit", "local", "agent",
                                                                             "testclient")
    assert REQUEST_ACTOR.get() is None  # reset after the request


def test_serving_changes_are_recorded_ok_and_refused(settings, queue, monkeypatch):
    from trainers import registry

    version = SimpleNamespace(version="3", run_id="run-from-elsewhere")
    monkeypatch.setattr(registry, "resolve", lambda uri, name, selector: version)
    monkeypatch.setattr(registry, "set_serving", lambda uri, name, selector: version)
    with pytest.raises(OppenError, match="needs the admin role"):
        PlatformTools(settings, "team-a", queue=queue, admin=False).deploy_model("mnist", version="3")
    agent = PlatformTools(settings, "team-a", queue=queue, admin=True)
    with pytest.raises(OppenError, match="no job of this platform"):
        agent.deploy_model("mnist", version="3")
    from ray_apps.scheduler.provenance import serve_if_allowed

    serve_if_allowed("http://mlflow", queue.store, "mnist", registry.Selector(version="3"), allow_any_run=True,
                     actor=Actor("root", None, "cli"))
    forbidden, refused, served = queue.audit.export()
    assert (forbidden["outcome"], forbidden["tenant"], forbidden["params"]) == ("refused", "team-a", {
        "version": "3", "alias": None})
    assert "needs the admin role" in forbidden["reason"]
    assert (refused["action"], refused["target"], refused["front_end"], refused["outcome"]) == (
        "model.serve", "mnist", "agent", "refused")
    assert "no job of this platform" in refused["reason"]
    assert (served["user"], served["outcome"], served["params"]) == ("root", "ok", {
        "selector": "version:3", "allow_any_run": True, "version": "3"})


# ---------------------------------------------------------------- the dispatcher's decisions


class FakeRay:
    def __init__(self):
        self.stopped = []

    def stop_job(self, sid):
        self.stopped.append(sid)


def test_the_dispatcher_s_admit_preempt_and_requeue_are_system_records(queue, monkeypatch):
    from ray_apps.scheduler import dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "submit_entrypoint", lambda *a, **kw: None)
    monkeypatch.setattr(dispatcher_module, "create_run", lambda *a, **kw: ("run-1", None))
    job = queue.submit("mnist", {"epochs": 1}, tenant="team-a", actor=ANA)
    d = dispatcher_module.Dispatcher(queue)
    d._client = FakeRay()
    assert d._admit(job.id)
    queue.store.transition(job.id, JobState.RUNNING)
    assert d._preempt(job.id)
    info = SimpleNamespace(status=SimpleNamespace(value="STOPPED"), start_time=1000, end_time=2000, message="")
    d._reconcile(queue.get(job.id), info, dispatcher_module.CycleReport())
    assert queue.get(job.id).state is JobState.QUEUED
    _, admit, preempt, requeue = queue.audit.export()
    for rec, action in ((admit, "job.admit"), (preempt, "job.preempt"), (requeue, "job.requeue")):
        assert (rec["action"], rec["user"], rec["front_end"], rec["tenant"], rec["target"], rec["outcome"]) == (
            action, "system", "dispatcher", "team-a", job.id, "ok")
    assert admit["params"] == {"attempt": 1, "ray_submission_id": job.id} and admit["reason"] == "admitted (attempt 1)"
    assert preempt["reason"].startswith("preempted: asked to checkpoint at its next step")
    assert requeue["reason"] == "preempted; resumes from its last checkpoint"
    assert queue.audit.verify().ok
