"""A Ray Tune search as a job of the queue, without Ray: its checks and refusals, the gang it holds,
the command the dispatcher runs for it, its idempotency, the store's migration, and its entry points
(the agent tool, the CLI, the REST body)."""

from __future__ import annotations

import shlex
import sqlite3

import pytest
from sqlalchemy import MetaData, Table, create_engine

from ray_apps.agent.tools import PlatformTools
from ray_apps.config import Settings
from ray_apps.costs.meter import allocation_of
from ray_apps.scheduler.api import Conflict, Queue, QueueError
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore, jobs
from ray_apps.training import entrypoint_for
from trainers.errors import Infeasible
from trainers.specs import SpecError
from trainers.tune import DEFAULT_SPACES, build_parser

NODES = [{"CPU": 16.0, "GPU": 2.0}]  # the cluster the queue checks feasibility against


@pytest.fixture()
def queue(tmp_path, monkeypatch):
    monkeypatch.setattr(Queue, "max_nodes", lambda self: NODES)
    settings = Settings(data_dir=tmp_path / "data")
    return Queue.from_settings(settings, QueueConfig(tenants={"team-q": {"cpus": 4}}))


def search_of(queue, search, params=None, **kw):
    return queue.submit("mnist", {"epochs": 1, "cpus_per_worker": 1, **(params or {})}, search=search, **kw)


# ---------------------------------------------------------------- checks, refusals and the gang


def test_a_search_keeps_its_trainer_fixed_params_and_settings_and_holds_max_concurrent_gangs(queue):
    job = search_of(queue, {"num_samples": 6, "max_concurrent": 3, "budget_usd": 0.5,
                            "space": ["lr=loguniform:1e-4:1e-2"]}, params={"num_workers": 2})
    assert job.state is JobState.QUEUED and job.trainer == "mnist" and job.id.startswith("tune-mnist-")
    assert job.params == {"epochs": 1, "cpus_per_worker": 1.0, "num_workers": 2}
    assert job.search == {"num_samples": 6, "max_concurrent": 3, "budget_usd": 0.5,
                          "space": ["lr=loguniform:1e-4:1e-2"], "search_seed": 0, "grace_period": 1}
    assert (job.workers, job.cpus_per_worker, job.gpus_per_worker) == (6, 1.0, 0.0)  # 3 trials x 2 workers
    assert queue.get(job.id).search == job.search
    # Defaults are made explicit: the record says what runs.
    plain = search_of(queue, {})
    assert plain.search["space"] == DEFAULT_SPACES["mnist"] and plain.search["num_samples"] == 4
    assert plain.workers == 1
    # What the meter charges: the whole reserved gang, not one trial's.
    alloc = allocation_of(job)
    assert (alloc.cpus, alloc.gpus) == (6.0, 0.0) and alloc.memory_gib > 0
    # A training job is what it was.
    train = queue.submit("mnist", {"epochs": 1})
    assert train.search is None and train.id.startswith("mnist-")


def test_quota_and_feasibility_see_the_search_s_whole_gang(queue):
    assert queue.validate("mnist", {"cpus_per_worker": 1}, search={"max_concurrent": 4}, tenant="team-q").ok
    refused = queue.validate("mnist", {"cpus_per_worker": 1}, search={"max_concurrent": 5}, tenant="team-q")
    assert not refused.ok and "asks for 5 CPU" in refused.reason and refused.workers == 5
    with pytest.raises(Infeasible, match="asks for 32 CPU"):
        search_of(queue, {"max_concurrent": 32})  # 32 x 1 CPU on a 16-CPU cluster


@pytest.mark.parametrize("search,field,reason", [
    ({"num_samples": 0}, "search", "--num-samples must be a whole number in [1, 256], got 0"),
    ({"num_samples": 257}, "search", "in [1, 256], got 257"),
    ({"max_concurrent": 65}, "search", "--max-concurrent must be a whole number in [1, 64], got 65"),
    ({"num_samples": True}, "search", "got True"),
    ({"num_samples": "4"}, "search", "got '4'"),
    ({"budget_usd": -1}, "search", "--budget-usd must be a positive amount in USD, got -1"),
    ({"budget_usd": float("inf")}, "search", "got inf"),
    ({"trials": 3}, "search", "unknown search setting(s): trials"),
    ({"space": []}, "search", "--space must be 1 to 32 items"),
    ({"space": "lr=uniform:0.1:0.2"}, "search", "--space must be 1 to 32 items"),
    ({"space": ["lr=uniform:0.1:0.2\n--no-tracking"]}, "search", "one line"),
    ({"space": ["depth=choice:1,2"]}, "search", "mnist has no parameter 'depth'"),
    ({"space": ["lr=uniform:0.2:0.1"]}, "search", "low < high"),
    ({"space": ["width=randint:8:inf"]}, "search", "finite low < high"),
    ({"space": ["lr=choice:0.1;rm -rf /"]}, "search", "--lr must be a finite number, got '0.1;rm -rf /'"),
    ({"space": ["num_workers=choice:1,2"]}, "search", "--space may not vary num_workers"),
    ({"space": ["batch_size=choice:0"]}, "search", "--batch-size must be at least 1"),
    ("lots", "search", "search must be an object"),
])
def test_bad_searches_are_refused_naming_the_value_and_nothing_is_stored(queue, search, field, reason):
    with pytest.raises(QueueError) as err:
        search_of(queue, search)
    assert err.value.field == field and reason in str(err.value), str(err.value)
    assert queue.list() == []


def test_only_searchable_trainers_and_valid_fixed_params_are_accepted(queue):
    with pytest.raises(QueueError, match="probe cannot be searched") as err:
        queue.submit("probe", {}, search={})
    assert err.value.field == "trainer"
    with pytest.raises(SpecError, match="--epochs must be at least 1") as err:
        search_of(queue, {}, params={"epochs": 0})
    assert err.value.field == "params.epochs"


def test_an_idempotency_key_covers_the_search(queue):
    first = search_of(queue, {"num_samples": 4}, idempotency_key="k1")
    # The same request (defaults spelled out or not) returns the first job...
    assert search_of(queue, {"num_samples": 4, "max_concurrent": 1, "space": None}, idempotency_key="k1").id == first.id
    # ...another search, or the plain training job, under that key is a conflict.
    with pytest.raises(Conflict):
        search_of(queue, {"num_samples": 5}, idempotency_key="k1")
    with pytest.raises(Conflict):
        search_of(queue, {"num_samples": 4, "search_seed": 1}, idempotency_key="k1")
    with pytest.raises(Conflict):
        queue.submit("mnist", {"epochs": 1, "cpus_per_worker": 1}, idempotency_key="k1")
    # A plain job's request hash is what it always was: keys stored before searches existed still match.
    plain = queue.submit("mnist", {"epochs": 1}, idempotency_key="k2")
    assert queue.submit("mnist", {"epochs": 1}, idempotency_key="k2").id == plain.id


# ---------------------------------------------------------------- the command the dispatcher runs


def test_the_search_entrypoint_is_trainers_tune_with_each_setting_one_word():
    hostile = ["lr=choice:0.1; touch /tmp/pwned", "width=choice:8 16 $(id)", "--no-tracking", "a'b\"c`d`"]
    search = {"num_samples": 4, "max_concurrent": 2, "budget_usd": 0.05, "space": hostile, "search_seed": 7,
              "grace_period": 1}
    entry = entrypoint_for("mnist", {"epochs": 1}, ["--run-name", "tune-mnist-x", "--mlflow-run-id", "r1"],
                           search=search)
    words = shlex.split(entry)
    assert words == ["python", "-m", "trainers.tune", "mnist", "--epochs", "1", "--num-samples", "4",
                     "--max-concurrent", "2", "--search-seed", "7", "--grace-period", "1", "--budget-usd", "0.05",
                     *[f"--space={item}" for item in hostile], "--run-name", "tune-mnist-x", "--mlflow-run-id", "r1"]
    # What trains.tune parses from it: every item is a space item, none became a flag of its own.
    args = build_parser().parse_args(words[3:])
    assert args.space == hostile and not args.no_tracking and args.mlflow_run_id == "r1"
    assert args.run_name == "tune-mnist-x" and args.budget_usd == 0.05 and args.max_concurrent == 2
    # A training job's command is unchanged.
    assert entrypoint_for("mnist", {"epochs": 1}, ["--resume"]) == "python -m trainers.mnist --epochs 1 --resume"


def test_the_dispatcher_submits_a_search_under_its_parent_run_and_restarts_it_on_a_later_attempt(queue, monkeypatch):
    from ray_apps.scheduler import dispatcher as dispatcher_module

    sent = []
    monkeypatch.setattr(dispatcher_module, "submit_entrypoint",
                        lambda settings, sid, entrypoint, meta, **kw: sent.append((sid, entrypoint, meta)))
    job = search_of(queue, {"num_samples": 2, "space": ["lr=uniform:0.001:0.01"]})
    d = dispatcher_module.Dispatcher(queue)
    for attempt, sid in ((1, job.id), (2, f"{job.id}-r2")):
        if attempt == 2:
            queue.store.transition(job.id, JobState.RUNNING)
            queue.store.transition(job.id, JobState.PREEMPTING)
            queue.store.transition(job.id, JobState.QUEUED)
        started = queue.store.transition(job.id, JobState.STARTING, attempt=attempt, ray_submission_id=sid,
                                         mlflow_run_id="parent-run")
        d._submit(started)
    (sid1, entry1, meta1), (sid2, entry2, _) = sent
    assert sid1 == job.id and meta1["kind"] == "tune" and meta1["mlflow_run_id"] == "parent-run"
    words = shlex.split(entry1)
    assert words[:4] == ["python", "-m", "trainers.tune", "mnist"] and "--space=lr=uniform:0.001:0.01" in words
    assert words[-4:] == ["--run-name", job.id, "--mlflow-run-id", "parent-run"]
    assert sid2 == f"{job.id}-r2" and shlex.split(entry2)[-1] == "--resume"
    assert build_parser().parse_args(shlex.split(entry2)[3:]).resume


def test_nothing_launches_a_search_into_ray_but_the_dispatcher():
    from ray_apps import training

    assert not hasattr(training, "submit_search")


# ---------------------------------------------------------------- the store


def test_a_database_made_before_searches_gains_the_column_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "old.db"
    old = MetaData()
    Table("jobs", old, *[c._copy() for c in jobs.columns if c.name != "search"])
    old.create_all(create_engine(f"sqlite:///{path}"))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO jobs (id, trainer, params, tenant, priority, state, workers, cpus_per_worker, "
                   "gpus_per_worker, submitted_at, attempt, message, updated_at) VALUES ('old-1', 'mnist', "
                   "'{\"epochs\": 1}', 'a', 'normal', 'SUCCEEDED', 1, 2.0, 0.0, 1.0, 1, '', 2.0)")
    assert "search" not in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")}

    store = JobStore(f"sqlite:///{path}")
    assert "search" in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")}
    kept = store.get("old-1")
    assert kept.search is None and kept.params == {"epochs": 1} and kept.state is JobState.SUCCEEDED
    store.add(id="s-1", trainer="mnist", params={}, tenant="a", priority="normal", workers=2, cpus_per_worker=1.0,
              gpus_per_worker=0.0, search={"num_samples": 2})
    store.add(id="t-1", trainer="mnist", params={}, tenant="a", priority="normal", workers=1, cpus_per_worker=1.0,
              gpus_per_worker=0.0)
    again = JobStore(f"sqlite:///{path}")  # a second open (another process) changes nothing
    assert again.get("s-1").search == {"num_samples": 2} and again.get("t-1").search is None
    # A training job's search is SQL NULL, as in the rows from before.
    nulls = sqlite3.connect(path).execute("SELECT id FROM jobs WHERE search IS NULL ORDER BY id").fetchall()
    assert nulls == [("old-1",), ("t-1",)]


# ---------------------------------------------------------------- entry points


def test_the_agent_s_search_is_a_queued_job_of_its_tenant_with_its_key_and_cancellable(queue):
    tools = PlatformTools(queue.settings, queue=queue).for_caller("team-q", admin=False, request_key="req-1")
    args = {"trainer": "mnist", "num_samples": 3, "max_concurrent": 2, "budget_usd": 0.01,
            "params": {"epochs": 1, "cpus_per_worker": 1}}
    r = tools.call("start_hyperparameter_search", args)
    assert r["state"] == "QUEUED" and r["tenant"] == "team-q" and r["trainer"] == "mnist"
    assert r["search"]["num_samples"] == 3 and r["search"]["budget_usd"] == 0.01
    job = queue.get(r["id"], tenant="team-q")
    assert job.search == r["search"] and (job.workers, job.cpus_per_worker) == (2, 1.0)
    # The same request retried (the client lost the answer) queues no second search.
    retried = PlatformTools(queue.settings, queue=queue).for_caller("team-q", admin=False, request_key="req-1")
    assert retried.call("start_hyperparameter_search", args)["id"] == job.id
    assert len(queue.list()) == 1
    # A search over the tenant's quota is refused as the queue refuses it.
    with pytest.raises(Infeasible, match="quota is 4 CPU"):
        tools.for_caller("team-q", admin=False).call("start_hyperparameter_search", {**args, "max_concurrent": 5})
    with pytest.raises(QueueError, match="mnist has no parameter 'depth'"):
        tools.call("start_hyperparameter_search", {**args, "space": ["depth=choice:1,2"]})
    assert tools.call("cancel_job", {"job_id": job.id}) == {"cancelled": [job.id], "refused": []}
    assert queue.get(job.id).state is JobState.CANCELLED


def test_asking_the_agent_for_a_search_queues_one_and_says_so(queue, tmp_path):
    from ray_apps.agent.graph import Agent

    agent = Agent(PlatformTools(queue.settings, queue=queue), db_path=tmp_path / "threads.db")
    reply = agent.ask("tune mnist with 3 trials and a $0.05 budget", tenant="team-q", admin=False)
    (call,) = reply.tool_calls
    assert call["name"] == "start_hyperparameter_search" and "error" not in call, call
    job = queue.get(call["result"]["id"])
    assert job.tenant == "team-q" and job.search["num_samples"] == 3 and job.search["budget_usd"] == 0.05
    assert reply.answer.startswith(f"Queued search {job.id} (QUEUED")


def test_oppen_tune_queues_the_search(queue, tmp_path, monkeypatch, capsys):
    from ray_apps import cli

    config = tmp_path / "platform.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    rc = cli.main(["--config", str(config), "tune", "mnist", "--epochs", "1", "--cpus-per-worker", "1",
                   "--num-samples", "3", "--max-concurrent", "2", "--space", "lr=uniform:0.001:0.01",
                   "--priority", "low", "--tenant", "team-t", "--no-follow"])
    out = capsys.readouterr().out
    assert rc == 0, out
    (job,) = Queue.from_settings(cli.load_settings(str(config))).list()
    assert job.id in out and "2 worker(s): 2 CPU" in out
    assert (job.trainer, job.priority, job.tenant, job.params) == ("mnist", "low", "team-t",
                                                                   {"epochs": 1, "cpus_per_worker": 1.0})
    assert job.search["num_samples"] == 3 and job.search["space"] == ["lr=uniform:0.001:0.01"]
    assert cli.main(["--config", str(config), "queue", "list"]) == 0
    assert f"{job.id}" in (listed := capsys.readouterr().out) and "search of 3, 2 at a time" in listed
    assert cli.main(["--config", str(config), "tune", "mnist", "--num-samples", "0", "--no-follow"]) == 2
    assert "--num-samples must be a whole number" in capsys.readouterr().err


def test_the_rest_body_bounds_the_search_and_forbids_other_keys():
    from pydantic import ValidationError

    from ray_apps.serve.platform_api import JobOut, SubmitJob

    body = SubmitJob(trainer="mnist", search={"num_samples": 8, "space": ["lr=uniform:0.001:0.01"]})
    assert body.search.model_dump()["max_concurrent"] == 1
    for bad in ({"num_samples": 0}, {"num_samples": 257}, {"max_concurrent": 65}, {"budget_usd": 0},
                {"space": ["x" * 201]}, {"space": []}, {"command": "id"}):
        with pytest.raises(ValidationError):
            SubmitJob(trainer="mnist", search=bad)
    assert "search" in JobOut.model_fields and JobOut.model_fields["search"].default is None
