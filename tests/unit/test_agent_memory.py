"""The agent's long-term memory: per tenant, across threads and processes, bounded, forgettable,
citing its evidence; fed by the dispatcher when a job ends. A real SQLite store file in tmp_path;
Ray is a thin fake (a job's info and its logs)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage

from ray_apps.agent.graph import Agent
from ray_apps.agent.memory import Memory, first_error, fingerprint, normalise
from ray_apps.agent.tools import PlatformTools
from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobRecord
from trainers.errors import Forbidden, NotFound

ERROR = ("(RayTrainWorker pid={pid}, ip=10.0.0.{ip}) RuntimeError: shape mismatch at layer {layer}: got {got}, "
         "expected 256 in /tmp/ray/session_{session}/runtime_resources/mnist_model.py line {line}")


def failing_log(pid, layer, got, session, line):
    worker = ERROR.format(pid=pid, ip=pid % 7, layer=layer, got=got, session=session, line=line)
    return ["[oppen] run mnist-x mlflow_run_id=r resume=False", "Traceback (most recent call last):",
            f'  File "/tmp/ray/session_{session}/trainers/mnist.py", line {line}, in main', worker,
            f"error: training failed: {worker.split(') ', 1)[1]}"]


@pytest.fixture()
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", agent={"memory_items": 100})


@pytest.fixture()
def tools(settings):
    return PlatformTools(settings, queue=Queue.from_settings(settings, QueueConfig()))


def finished(tools, job_id, state=JobState.FAILED, tenant="team-a", params=None, run_id=None, message=""):
    """A job the dispatcher saw end: queued, started under its Ray id and MLflow run, ended."""
    store = tools.queue.store
    store.add(id=job_id, trainer="mnist", params=params or {"epochs": 1}, tenant=tenant, priority="normal",
              workers=1, cpus_per_worker=2.0, gpus_per_worker=0.0)
    store.transition(job_id, JobState.STARTING, attempt=1, ray_submission_id=job_id, mlflow_run_id=run_id)
    store.transition(job_id, JobState.RUNNING, started_at=time.time() - 60)
    return store.transition(job_id, state, message=message)


def two_failures(tools):
    a = finished(tools, "mnist-20261130-100000-aaaaaa", run_id="a" * 32, message="exit code 1")
    b = finished(tools, "mnist-20261201-110000-bbbbbb", run_id="b" * 32, message="exit code 1")
    tools.memory.record_outcome(a, failing_log(pid=1234, layer=3, got=128, session="2026_11_30_1", line=88), 0.01)
    tools.memory.record_outcome(b, failing_log(pid=77, layer=5, got=64, session="2026_12_01_9", line=91), 0.02)
    return a, b


# ---------------------------------------------------------------- across threads and tenants


def test_two_runs_with_the_same_error_are_named_in_a_new_thread_and_only_for_their_tenant(tools, settings, tmp_path):
    a, b = two_failures(tools)
    db = tmp_path / "threads.db"
    for question in ("has mnist failed like this before?", "has this failed before?"):
        # A new process: new tools, new agent, the same files.
        agent = Agent(PlatformTools(settings, queue=tools.queue), db_path=db)
        reply = agent.ask(question, thread_id=f"new {question}", tenant="team-a", admin=False)
        assert reply.tool_calls[0]["name"] == "recall", reply
        assert a.id in reply.answer and b.id in reply.answer and "2 time(s)" in reply.answer
        assert "a" * 32 in reply.answer and "b" * 32 in reply.answer  # the evidence: their MLflow runs
        assert "shape mismatch at layer <n>" in reply.answer
    other = Agent(tools, db_path=db).ask("has mnist failed like this before?", tenant="team-b", admin=False)
    assert other.tool_calls[0]["name"] == "recall" and "I remember no mnist failures" in other.answer
    assert a.id not in other.answer and b.id not in other.answer
    with pytest.raises(Forbidden):
        tools.for_caller("team-b", admin=False).call("recall", {"team": "team-a"})
    # An admin (no tenant) recalls every tenant's.
    assert tools.call("recall", {"kind": "failures"})["items"][0]["job_ids"] == [a.id, b.id]


def test_remember_recall_and_forget_that(tools, tmp_path):
    agent = Agent(tools, db_path=tmp_path / "threads.db")
    said = agent.ask("remember that lr 0.003 works best for mnist", thread_id="t1", tenant="team-a", admin=False)
    note = said.tool_calls[0]["result"]
    assert note["text"] == "lr 0.003 works best for mnist" and note["trainer"] == "mnist" and note["id"] in said.answer
    recalled = agent.ask("what do you remember about mnist", thread_id="t2", tenant="team-a", admin=False)
    assert "lr 0.003 works best for mnist" in recalled.answer and note["id"] in recalled.answer
    assert "lr 0.003" not in agent.ask("what do you remember about mnist", tenant="team-b", admin=False).answer
    gone = agent.ask("forget that", thread_id="t2", tenant="team-a", admin=False)
    assert gone.tool_calls[0]["args"] == {"item_id": note["id"]} and "Forgotten: the note" in gone.answer
    again = agent.ask("what do you remember about mnist", thread_id="t3", tenant="team-a", admin=False)
    assert "lr 0.003" not in again.answer and "I remember no mnist" in again.answer
    # Both changes to the memory are actions of the audit log, for team-a, from the agent.
    changes = [(r["action"], r["target"], r["tenant"], r["front_end"]) for r in tools.queue.audit.export()]
    assert changes == [("memory.remember", note["id"], "team-a", "agent"),
                       ("memory.forget", note["id"], "team-a", "agent")]
    # Nothing recalled in a thread: "that" is nothing, and the answer says so.
    lost = agent.ask("forget that", thread_id="t4", tenant="team-a", admin=False)
    assert "error" in lost.tool_calls[0] and "haven't recalled" in lost.answer


def test_another_tenant_cannot_forget_a_memory_by_its_id(tools):
    note = tools.for_caller("team-a", admin=False).call("remember", {"text": "batch 256 is fastest"})
    with pytest.raises(NotFound, match="of yours"):
        tools.for_caller("team-b", admin=False).call("forget", {"item_id": note["id"]})
    assert tools.for_caller("team-a", admin=False).call("forget", {"item_id": note["id"]})["forgotten"]["id"] == note["id"]


def test_what_worked_best_cites_the_best_run_and_its_settings(tools, tmp_path):
    for job_id, lr, acc, run in (("mnist-20261130-100000-cccccc", 0.01, 0.91, "c" * 32),
                                 ("mnist-20261130-110000-dddddd", 0.003, 0.98, "d" * 32),
                                 ("mnist-20261130-120000-eeeeee", 0.1, 0.52, "e" * 32)):
        job = finished(tools, job_id, JobState.SUCCEEDED, params={"epochs": 2, "lr": lr}, run_id=run)
        tools.memory.record_outcome(job, [f'OPPEN_RESULT {{"test_accuracy": {acc}, "mlflow_run_id": "{run}"}}'], 0.5)
    reply = Agent(tools, db_path=tmp_path / "t.db").ask("what lr worked best for mnist last time?", tenant="team-a",
                                                         admin=False)
    best = reply.answer.split("Best mnist run by test_accuracy: ", 1)[1]
    assert best.startswith("job mnist-20261130-110000-dddddd (mnist, epochs=2, lr=0.003) SUCCEEDED: "
                           "test_accuracy 0.98, cost $0.5000 (MLflow run " + "d" * 32)
    assert reply.answer.index("Latest: job mnist-20261130-120000-eeeeee") > 0  # the last time, newest first


def test_the_model_path_may_call_the_memory_tools_and_forget_that(tools):
    class Scripted:
        def __init__(self, *replies):
            self.replies = list(replies)

        def invoke(self, messages, schemas):
            assert {"recall", "remember", "forget"} <= {s["function"]["name"] for s in schemas}
            return self.replies.pop(0)

    calls = [("remember", {"text": "the llm diverges above lr 0.002"}), ("forget", {"item_id": "that"})]
    agent = Agent(tools, model=Scripted(*[reply for name, args in calls for reply in (
        AIMessage("", tool_calls=[{"name": name, "args": args, "id": "c1"}]), AIMessage("Done."))]))
    for _ in calls:
        reply = agent.ask("go", thread_id="m")
        assert "error" not in reply.tool_calls[0], reply.tool_calls
    assert tools.memory.items(None, "notes") == []


def test_why_were_a_teams_jobs_preempted_comes_from_the_job_events(tools, tmp_path):
    store = tools.queue.store
    for job_id, tenant in (("mnist-20261130-100000-ffffff", "team-b"), ("mnist-20261130-100000-abcdef", "team-a")):
        store.add(id=job_id, trainer="mnist", params={}, tenant=tenant, priority="low", workers=1,
                  cpus_per_worker=1.0, gpus_per_worker=0.0)
        for _ in range(2):
            store.transition(job_id, JobState.STARTING)
            store.transition(job_id, JobState.RUNNING)
            store.transition(job_id, JobState.PREEMPTING, message="preempted by a higher-priority job")
            store.transition(job_id, JobState.QUEUED)
    reply = Agent(tools, db_path=tmp_path / "t.db").ask("why did team-b's jobs keep getting preempted last week?")
    assert reply.tool_calls[0]["args"] == {"kind": "preemptions", "since": "7d", "team": "team-b"}
    assert "preempted 2 time(s) in the last 7d" in reply.answer and "mnist-20261130-100000-ffffff" in reply.answer
    assert "abcdef" not in reply.answer and "preempted by a higher-priority job" in reply.answer
    mine = tools.for_caller("team-a", admin=False).call("recall", {"kind": "preemptions"})
    assert [j["job_id"] for j in mine["jobs"]] == ["mnist-20261130-100000-abcdef"]


# ---------------------------------------------------------------- bounded


def outcome(i, tenant="team-a", state=JobState.SUCCEEDED):
    return JobRecord(id=f"mnist-20261130-{i:06d}-abcdef", trainer="mnist", params={"epochs": 1}, tenant=tenant,
                     priority="normal", state=state, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                     submitted_at=i, started_at=i, ended_at=i + 1.0, attempt=1, ray_submission_id=None,
                     mlflow_run_id=None, message="", updated_at=i)


def test_the_bound_holds_after_many_jobs_and_evicts_the_least_recently_used(tmp_path):
    memory = Memory.open(tmp_path / "memory.db", max_items=100)
    for i in range(100):
        memory.record_outcome(outcome(i), [])
    kept = outcome(0).id
    assert memory.recall("team-a", kind="outcomes", job_id=kept)["items"][0]["id"] == kept  # used: kept longer
    for i in range(100, 150):
        memory.record_outcome(outcome(i), [])
    ids = {item["id"] for item in memory.items("team-a", "outcomes")}
    assert len(ids) == 100 and kept in ids and outcome(1).id not in ids and outcome(149).id in ids
    for i in range(150, 500):
        memory.record_outcome(outcome(i, state=JobState.FAILED),
                              [f"KeyError: 'column_{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}'"])
        memory.remember("team-a", f"note {i}")
    for kind in ("outcomes", "failures", "notes"):
        assert len(memory.items("team-a", kind)) == 100, kind
    assert memory.items("team-b", "outcomes") == []
    reopened = Memory.open(tmp_path / "memory.db", max_items=100)  # on disk
    assert len(reopened.items(None, "outcomes")) == 100


# ---------------------------------------------------------------- fingerprints


@pytest.mark.parametrize("first,second", [
    ("RuntimeError: shape mismatch at layer 3: got 128 in /tmp/ray/session_1/a.py",
     "RuntimeError: shape mismatch at layer 12: got 64 in /home/ray/session_2/b.py"),
    ("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 15.78 GiB total)",
     "CUDA out of memory. Tried to allocate 512 GiB (GPU 3; 79.1 GiB total)"),
    ("ValueError: job mnist-20261130-000000-aaaaaa-r2 object at 0x7f3a2b9c", "ValueError: job "
     "llm-20261201-235959-0f0f0f object at 0xdeadbeef"),
    ("(RayTrainWorker pid=1, ip=10.0.0.1) OSError: checkpoint 3f2a9c81d0 missing",
     "(RayTrainWorker pid=99, ip=10.0.0.7) OSError: checkpoint 0b1c2d3e4f missing"),
    ("2026-11-30 12:00:01,123 ERROR request 123e4567-e89b-12d3-a456-426614174000 to http://10.0.0.1:8265/api failed",
     "2026-12-01 08:30:00,999 ERROR request 00000000-0000-4000-8000-000000000000 to http://head:8265/api failed"),
])
def test_what_differs_between_two_runs_of_one_error_is_normalised_away(first, second):
    assert normalise(first) == normalise(second)
    assert fingerprint("mnist", [first])["id"] == fingerprint("mnist", [second])["id"]


def test_normalised_lines_keep_the_words_and_name_what_was_replaced():
    assert normalise("ValueError: bad shape (3, 28, 28) in /data/mnist/x.npy at 0xff, job "
                     "mnist-20261130-000000-aaaaaa") == "ValueError: bad shape (<n>, <n>, <n>) in <path> at <hex>, job <job>"
    assert normalise("10.0.0.1:6379 it/s 12it/s") == "<addr> it/s <n>it/s"
    assert len(normalise("x" * 5000)) <= 200


def test_different_errors_or_trainers_are_different_fingerprints():
    oom = fingerprint("mnist", ["RuntimeError: CUDA out of memory"])
    assert oom["id"] != fingerprint("mnist", ["RuntimeError: NCCL timeout"])["id"]
    assert oom["id"] != fingerprint("llm", ["RuntimeError: CUDA out of memory"])["id"]
    assert oom["id"] != fingerprint("mnist", ["ValueError: CUDA out of memory"])["id"]


def test_the_first_distinctive_line_is_the_drivers_report_then_an_exception_then_a_failure_then_rays_message():
    assert first_error(["noise", "KeyError: 'a'", "error: training failed: torch.OutOfMemoryError: boom"]) == (
        "OutOfMemoryError", "torch.OutOfMemoryError: boom")
    assert first_error(["noise", "UserWarning: meh", "ray.exceptions.RayTaskError(KeyError): 'x'", "KeyError: 'y'"]) \
        == ("RayTaskError", "ray.exceptions.RayTaskError(KeyError): 'x'")
    assert first_error(["Traceback (most recent call last):", "worker killed: out of memory"]) == (
        "Error", "worker killed: out of memory")
    assert first_error([], "stopped outside the queue") == ("Stopped", "stopped outside the queue")
    assert first_error([], "") == ("Error", "no log line")


# ---------------------------------------------------------------- the dispatcher's hook


class FakeRay:
    """Only what the dispatcher asks of Ray when a job ends: its logs."""

    def __init__(self, logs: str | Exception):
        self.logs = logs

    def get_job_logs(self, submission_id):
        if isinstance(self.logs, Exception):
            raise self.logs
        return self.logs


def ended_in_ray(status, message=""):
    now = time.time() * 1000
    return SimpleNamespace(status=SimpleNamespace(value=status), start_time=now - 60_000, end_time=now,
                           message=message)


@pytest.fixture()
def dispatcher(tools, monkeypatch):
    from ray_apps.scheduler.dispatcher import Dispatcher

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there; the fake answers
    return Dispatcher(tools.queue)


def running(tools, job_id):
    tools.queue.store.add(id=job_id, trainer="mnist", params={"epochs": 1, "lr": 0.003}, tenant="team-a",
                          priority="normal", workers=1, cpus_per_worker=2.0, gpus_per_worker=0.0)
    tools.queue.store.transition(job_id, JobState.STARTING, attempt=1, ray_submission_id=job_id,
                                 mlflow_run_id="f" * 32)
    return tools.queue.store.transition(job_id, JobState.RUNNING, started_at=time.time() - 60)


def test_the_dispatcher_records_a_finished_jobs_outcome(tools, dispatcher):
    from ray_apps.scheduler.dispatcher import CycleReport

    ok = running(tools, "mnist-20261130-100000-111111")
    dispatcher._client = FakeRay('[oppen] epoch 1\nOPPEN_RESULT {"test_accuracy": 0.97, "cost_usd": 0.001}\n')
    dispatcher._reconcile(ok, ended_in_ray("SUCCEEDED"), CycleReport())
    bad = running(tools, "mnist-20261130-100000-222222")
    dispatcher._client = FakeRay("\n".join(failing_log(pid=5, layer=2, got=8, session="s", line=3)))
    dispatcher._reconcile(bad, ended_in_ray("FAILED", "Job entrypoint command failed with exit code 1"),
                          CycleReport())
    done = {o["id"]: o for o in tools.memory.items("team-a", "outcomes")}
    assert done[ok.id]["state"] == "SUCCEEDED" and done[ok.id]["value"] == 0.97
    assert done[ok.id]["metric"] == "test_accuracy" and done[ok.id]["params"] == {"epochs": 1, "lr": 0.003}
    assert done[ok.id]["run_ids"] == ["f" * 32] and done[ok.id]["cost_usd"] > 0  # the meter's figure
    assert done[bad.id]["state"] == "FAILED" and "exit code 1" in done[bad.id]["message"]
    [failure] = tools.memory.items("team-a", "failures")
    assert failure["job_ids"] == [bad.id] and failure["error_type"] == "RuntimeError" and failure["count"] == 1


def test_memory_never_breaks_the_dispatcher(tools, dispatcher):
    from ray_apps.scheduler.dispatcher import CycleReport

    class Broken:
        def record_outcome(self, *args):
            raise OSError("disk full")

    dispatcher.memory._memory = Broken()
    job = running(tools, "mnist-20261130-100000-333333")
    dispatcher._client = FakeRay(ConnectionError("Ray away"))
    report = CycleReport()
    dispatcher._reconcile(job, ended_in_ray("FAILED", "boom"), report)
    assert report.finished == [job.id] and tools.queue.get(job.id).state is JobState.FAILED


def test_an_admins_note_about_a_job_goes_to_that_jobs_tenant_with_its_evidence(tools):
    job = finished(tools, "mnist-20261130-100000-444444", JobState.SUCCEEDED, run_id="9" * 32)
    note = tools.call("remember", {"text": "this run used the cleaned data", "job_id": job.id[-6:]})
    assert (note["tenant"], note["job_ids"], note["run_ids"]) == ("team-a", [job.id], ["9" * 32])
    found = tools.for_caller("team-a", admin=False).call("recall", {"kind": "notes"})
    assert [i["id"] for i in found["items"]] == [note["id"]]
    assert tools.call("remember", {"text": "admins' own note"})["tenant"] == "default"
