import threading

import pytest

from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import InvalidTransition, JobStore, UnknownJob


@pytest.fixture()
def store(tmp_path):
    return JobStore(f"sqlite:///{tmp_path / 'queue.db'}")


def add(store, id, **kw):
    args = dict(trainer="mnist", params={"epochs": 1}, tenant="a", priority="normal", workers=1,
                cpus_per_worker=1.0, gpus_per_worker=0.0)
    return store.add(id=id, **{**args, **kw})


def test_add_get_list_and_events(store):
    add(store, "j1", now=1.0)
    add(store, "j2", tenant="b", now=2.0)
    assert store.get("j1").state is JobState.QUEUED and store.get("j1").params == {"epochs": 1}
    assert [j.id for j in store.list()] == ["j1", "j2"]
    assert [j.id for j in store.list(tenant="b")] == ["j2"]
    store.transition("j1", JobState.STARTING, now=3.0)
    store.transition("j1", JobState.RUNNING, now=4.0, started_at=4.0)
    done = store.transition("j1", JobState.SUCCEEDED, now=9.0)
    assert done.started_at == 4.0 and done.ended_at == 9.0
    assert [(e.from_state, e.to_state, e.at) for e in store.events("j1")] == [
        (None, "QUEUED", 1.0), ("QUEUED", "STARTING", 3.0), ("STARTING", "RUNNING", 4.0),
        ("RUNNING", "SUCCEEDED", 9.0)]


def test_terminal_states_are_final_and_expectations_are_checked(store):
    add(store, "j")
    store.transition("j", JobState.CANCELLED)
    with pytest.raises(InvalidTransition, match="cannot go from CANCELLED"):
        store.transition("j", JobState.STARTING)
    add(store, "k")
    with pytest.raises(InvalidTransition, match="is QUEUED, not RUNNING"):
        store.transition("k", JobState.SUCCEEDED, expect=JobState.RUNNING)
    with pytest.raises(UnknownJob):
        store.get("nope")


def test_concurrent_writers_each_stored_once_and_one_transition_wins(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    JobStore(url)
    errors, wins = [], []

    def submit(n):
        s = JobStore(url)  # its own engine, as separate processes would have
        try:
            for i in range(25):
                add(s, f"t{n}-{i}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = JobStore(url)
    assert errors == [] and len(store.list()) == 200

    def start(_):
        try:
            JobStore(url).transition("t0-0", JobState.STARTING, expect=JobState.QUEUED)
            wins.append(1)
        except InvalidTransition:
            pass

    racers = [threading.Thread(target=start, args=(n,)) for n in range(8)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(wins) == 1 and len(store.events("t0-0")) == 2


def test_a_job_that_ended_without_starting_stops_waiting(store):
    add(store, "rejected", state=JobState.REJECTED, now=10.0)
    assert store.get("rejected").waited_s(now=1000.0) == 0.0      # not 990 s and growing
    add(store, "cancelled", now=10.0)
    store.transition("cancelled", JobState.CANCELLED, now=25.0)
    assert store.get("cancelled").waited_s(now=1000.0) == 15.0
    add(store, "waiting", now=10.0)
    assert store.get("waiting").waited_s(now=40.0) == 30.0
    store.transition("waiting", JobState.STARTING, now=41.0)
    store.transition("waiting", JobState.RUNNING, now=42.0, started_at=42.0)
    assert store.get("waiting").waited_s(now=1000.0) == 32.0


def test_node_usage_adds_up_per_group_and_hour(store):
    hour = 1_800_000_000.0 - 1_800_000_000.0 % 3600
    store.add_node_usage("gpu", hour + 10, nodes=2, cpus=1, gpus=1, seconds=10)
    store.add_node_usage("gpu", hour + 20, nodes=1, cpus=1, gpus=1, seconds=10)
    store.add_node_usage("cpu", hour + 3600 + 5, nodes=1, cpus=2, gpus=0, seconds=5)
    gpu, = [u for u in store.node_usage() if u.group == "gpu"]
    assert (gpu.node_seconds, gpu.cpu_seconds, gpu.gpu_seconds) == (30, 30, 30)
    assert [u.group for u in store.node_usage(since=hour + 3600)] == ["cpu"]   # by the hour they fall in
    assert [u.group for u in store.node_usage(until=hour + 3600)] == ["gpu"]


def test_utilisation_is_the_jobs_hours_over_the_nodes_hours():
    from ray_apps.costs.report import CostReport, ReportRow
    from ray_apps.scheduler.store import NodeUsage

    report = CostReport(since=None, until=0, group_by=("tenant",),
                        total=ReportRow({}, cpu_core_hours=1.0, gpu_hours=0.5))
    report.set_node_usage([NodeUsage("cpu", 2 * 3600, 4 * 3600, 0), NodeUsage("gpu", 3600, 3600, 3600)])
    assert report.cpu_utilisation == pytest.approx(1.0 / 5) and report.gpu_utilisation == pytest.approx(0.5)
    assert report.as_dict()["nodes"][1] == {"group": "gpu", "node_hours": 1.0, "cpu_hours": 1.0, "gpu_hours": 1.0}
    empty = CostReport(since=None, until=0, group_by=("tenant",))
    empty.set_node_usage([])
    assert empty.gpu_utilisation is None   # single-head mode: nothing to set jobs against


def test_an_idempotency_key_returns_the_first_job_and_refuses_another_request(store):
    from ray_apps.scheduler.store import KeyReused

    first = add(store, "j1", idempotency=("k1", "hash-a"))
    assert add(store, "j2", idempotency=("k1", "hash-a")).id == "j1"  # the retry: the same job
    assert [j.id for j in store.list()] == ["j1"]
    assert add(store, "j3", tenant="b", idempotency=("k1", "hash-a")).id == "j3"  # keys are per tenant
    with pytest.raises(KeyReused, match="used for a different request \\(job j1\\)"):
        add(store, "j4", idempotency=("k1", "hash-b"))
    assert first.state is JobState.QUEUED


def test_newest_first_pages_continue_after_the_last_job_seen(store):
    for i in range(7):
        add(store, f"j{i}", now=float(i // 2))  # equal submission times are ordered by id
    pages, before = [], None
    while page := store.list(newest_first=True, limit=3, before=before):
        pages.append([j.id for j in page])
        before = page[-1]
    assert pages == [["j6", "j5", "j4"], ["j3", "j2", "j1"], ["j0"]]


def test_rejected_requests_are_forgotten_after_their_retention_and_nothing_else_is(store):
    add(store, "old-rejected", state=JobState.REJECTED, now=10.0, idempotency=("k", "h"))
    add(store, "new-rejected", state=JobState.REJECTED, now=100.0)
    add(store, "old-queued", now=10.0)
    assert store.prune_rejected(before=50.0) == 1
    assert {j.id for j in store.list()} == {"new-rejected", "old-queued"}
    assert store.events("old-rejected") == []


def test_cancelled_submissions_are_found_among_ray_s_live_jobs(store):
    add(store, "j1")
    add(store, "j2")
    store.transition("j1", JobState.STARTING, ray_submission_id="j1")
    store.transition("j2", JobState.STARTING, ray_submission_id="j2-r2")
    store.transition("j1", JobState.CANCELLED)
    assert store.cancelled_submissions(["j1", "j2-r2", "unknown"]) == {"j1"}
