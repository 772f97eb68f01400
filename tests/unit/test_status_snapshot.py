"""The status page's data over a real SQLite queue store: the queue, running jobs with live cost,
recent jobs with their metered cost, spend per day and tenant, links, and tenancy. MLflow is
unreachable here on purpose: the page must still stand, without run links or forecasts."""
import time

import pytest

from ray_apps.config import Settings
from ray_apps.costs.service import CostService
from ray_apps.observability.status import snapshot
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState as S
from ray_apps.scheduler.store import JobStore
from trainers.pricing import load_catalog


@pytest.fixture
def costs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    settings = Settings(data_dir=tmp_path)
    queue = Queue(settings, QueueConfig(), JobStore(f"sqlite:///{tmp_path / 'queue.db'}"))
    return CostService(queue, load_catalog(settings.costs_file))


def add(store, id, tenant, now):
    store.add(id=id, trainer="mnist", params={}, tenant=tenant, priority="normal", workers=1, cpus_per_worker=2,
              gpus_per_worker=0, state=S.QUEUED, message="", now=now)


def test_queue_running_recent_spend_and_links(costs):
    store, now = costs.queue.store, time.time()
    add(store, "waiting", "team-a", now - 40)
    add(store, "running", "team-a", now - 300)
    store.transition("running", S.STARTING, now=now - 250, attempt=1)
    store.transition("running", S.RUNNING, now=now - 240, started_at=now - 240, ray_submission_id="running")
    store.attempt_started("running", 1, now - 240)
    add(store, "done", "team-b", now - 900)
    store.transition("done", S.STARTING, now=now - 800, attempt=1)
    store.transition("done", S.RUNNING, now=now - 790, started_at=now - 790, ray_submission_id="done")
    store.attempt_started("done", 1, now - 790)
    store.attempt_ended("done", 1, now - 430)
    store.transition("done", S.SUCCEEDED, now=now - 430, ended_at=now - 430)
    costs.settle()

    snap = snapshot(costs, costs.queue.settings, now=now)
    assert [j["id"] for j in snap["queued"]] == ["waiting"] and snap["queued"][0]["waited_s"] == pytest.approx(40)
    running = snap["running"][0]
    assert running["id"] == "running" and running["cost_usd"] == pytest.approx(2 * 0.05 * 240 / 3600, rel=0.05)
    assert running["forecast"] is None                       # no MLflow: no progress, no forecast
    assert running["links"]["ray"] == "http://127.0.0.1:8265/#/jobs/running"
    recent = snap["recent"][0]
    assert recent["id"] == "done" and recent["cost_usd"] == pytest.approx(2 * 0.05 * 360 / 3600, rel=1e-6)
    # An untracked job's time: only the queue's part is known (the trainer's clock reports to MLflow).
    assert recent["phases"]["queued"] == pytest.approx(110) and recent["phases"]["training"] is None
    assert snap["spend_by_day"][-1]["day"] == time.strftime("%Y-%m-%d", time.gmtime(now - 430))
    assert {r["tenant"] for r in snap["spend_by_tenant"]} >= {"team-b"}

    mine = snapshot(costs, costs.queue.settings, tenant="team-b", now=now)
    assert mine["queued"] == [] and mine["running"] == [] and [j["id"] for j in mine["recent"]] == ["done"]
    assert {r["tenant"] for r in mine["spend_by_tenant"]} == {"team-b"}
