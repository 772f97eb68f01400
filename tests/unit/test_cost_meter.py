"""The meter and reports over a real SQLite queue store."""

import pytest

from ray_apps.costs.meter import Meter
from ray_apps.costs.report import ReportError, build_report, parse_groups, parse_since
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore
from trainers.pricing import parse_catalog

CATALOG = parse_catalog({"cpu_core_hour": 0.05, "default_gpu": "generic",
                         "gpus": {"generic": {"on_demand_hour": 0.25, "spot_hour": 0.10}}})


@pytest.fixture()
def store(tmp_path):
    return JobStore(f"sqlite:///{tmp_path / 'queue.db'}")


def add(store, id, *, tenant="team-a", trainer="mnist", workers=1, cpus=2.0, gpus=0.0, now=0.0, params=None):
    return store.add(id=id, trainer=trainer, params=params if params is not None else {"epochs": 1},
                     tenant=tenant, priority="normal", workers=workers, cpus_per_worker=cpus,
                     gpus_per_worker=gpus, now=now)


def run(store, job_id, start, end, *, attempt=1, final=JobState.SUCCEEDED):
    store.transition(job_id, JobState.STARTING, now=start - 1, attempt=attempt)
    store.transition(job_id, JobState.RUNNING, now=start, started_at=start)
    store.attempt_started(job_id, attempt, start)
    if end is not None:
        store.attempt_ended(job_id, attempt, end)
        store.transition(job_id, final, now=end, ended_at=end)


def test_cost_is_allocation_times_rate_times_ray_time_over_all_attempts(store):
    job = add(store, "j", workers=2, cpus=1.0, gpus=1.0, params={"epochs": 1, "num_workers": 2,
                                                                   "cpus_per_worker": 1, "gpus_per_worker": 1})
    run(store, "j", 100.0, 400.0, final=JobState.PREEMPTING)  # preempted after 300 s ...
    store.transition("j", JobState.QUEUED, now=401.0)
    run(store, "j", 1000.0, 1600.0, attempt=2)                # ... resumed for 600 s; the wait is free
    cost = Meter(store, CATALOG).cost_of(store.get(job.id))
    assert cost.seconds == pytest.approx(900.0) and cost.attempts == 2
    assert cost.cpu_usd == pytest.approx(2 * 0.05 * 900 / 3600)
    assert cost.gpu_usd == pytest.approx(2 * 0.25 * 900 / 3600)
    assert cost.gpu_hours == pytest.approx(0.5) and not cost.live


def test_a_running_job_is_charged_up_to_now_and_settling_freezes_the_price(store):
    add(store, "j")
    run(store, "j", 100.0, None)
    meter = Meter(store, CATALOG)
    live = meter.cost_of(store.get("j"), now=460.0)
    assert live.live and live.seconds == 360.0 and live.total_usd == pytest.approx(2 * 0.05 * 0.1)
    # Cancelled while running: the open attempt closes at Ray's end time (a bit after the cancel).
    store.transition("j", JobState.CANCELLED, now=500.0)
    assert [j.id for j in store.unmetered()] == ["j"]
    settled = meter.settle(store.get("j"), ray_end_time=lambda job: 502.0)
    assert settled.seconds == 402.0 and not settled.live
    assert store.unmetered() == [] and list(store.costs(unlogged=True)) == ["j"]
    # A later price change does not rewrite history.
    dearer = parse_catalog({"cpu_core_hour": 1.0, "gpus": {"generic": {"on_demand_hour": 1.0}}})
    assert Meter(store, dearer).cost_of(store.get("j")).total_usd == pytest.approx(settled.total_usd)


def test_jobs_that_never_ran_cost_nothing_and_are_not_metered(store):
    add(store, "queued")
    add(store, "cancelled")
    store.transition("cancelled", JobState.CANCELLED, now=5.0)
    meter = Meter(store, CATALOG)
    assert meter.cost_of(store.get("queued"), now=1e6).total_usd == 0.0
    assert store.unmetered() == []


def test_attempt_shorter_than_a_cycle_is_opened_and_closed_at_once(store):
    add(store, "j")
    store.transition("j", JobState.STARTING, now=1.0, attempt=1)
    store.attempt_ended("j", 1, 30.0, started_at=10.0)  # Ray says 10..30; RUNNING never seen
    store.transition("j", JobState.SUCCEEDED, now=31.0, ended_at=30.0)
    assert Meter(store, CATALOG).cost_of(store.get("j")).seconds == 20.0


def test_report_groups_by_tenant_trainer_and_day_and_respects_since(store):
    day = 86400.0
    for i, (tenant, start) in enumerate([("team-a", 10 * day), ("team-a", 10 * day + 50), ("team-b", 11 * day),
                                         ("team-b", 2 * day)]):
        add(store, f"j{i}", tenant=tenant, now=start - 5)
        run(store, f"j{i}", start, start + 3600)
    meter = Meter(store, CATALOG)
    jobs = store.list(ended_after=5 * day)
    assert {j.id for j in jobs} == {"j0", "j1", "j2"}  # j3 ended on day 2
    report = build_report(list(meter.costs_of(jobs, now=12 * day).values()), since=5 * day, until=12 * day,
                          group_by=("tenant",))
    rows = {r.group["tenant"]: r for r in report.rows}
    assert rows["team-a"].jobs == 2 and rows["team-a"].total_usd == pytest.approx(2 * 2 * 0.05)
    assert rows["team-b"].jobs == 1 and rows["team-b"].cpu_core_hours == pytest.approx(2.0)
    assert report.rows[0].group == {"tenant": "team-a"}  # biggest spend first
    assert report.total.total_usd == pytest.approx(3 * 0.1)
    by_day = build_report(list(meter.costs_of(jobs, now=12 * day).values()), since=None, until=12 * day,
                          group_by=("day",))
    assert sorted(r.group["day"] for r in by_day.rows) == ["1970-01-11", "1970-01-12"]


def test_report_arguments_are_checked():
    assert parse_since("7d", now=10 * 86400) == 3 * 86400
    assert parse_since("30m", now=3600) == 1800
    assert parse_since("2026-11-01") == pytest.approx(1793491200.0)
    with pytest.raises(ReportError, match="expected a duration"):
        parse_since("last tuesday")
    assert parse_groups("tenant, day") == ("tenant", "day")
    with pytest.raises(ReportError, match="cannot group by colour"):
        parse_groups("colour")
