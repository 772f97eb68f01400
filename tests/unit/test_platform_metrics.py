"""The platform's metrics, computed from a real SQLite queue store with crafted job histories and
read back through prometheus_client's own parser of the exposition format."""
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ray_apps.observability.metrics import PlatformCollector, month_start, rejection_reason
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState as S
from ray_apps.scheduler.store import JobStore, StoredCost


class FakeQueue:  # only what the collector reads: a real store and a real queue config
    def __init__(self, store, config):
        self.store, self.config = store, config


def add(store, id, tenant="team-a", priority="normal", trainer="mnist", gpus=0.0, workers=1, submitted=None,
        message=""):
    store.add(id=id, trainer=trainer, params={}, tenant=tenant, priority=priority, workers=workers,
              cpus_per_worker=1, gpus_per_worker=gpus, state=S.QUEUED, message=message)
    if submitted is not None:
        from sqlalchemy import update

        from ray_apps.scheduler.store import jobs
        with store.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == id).values(submitted_at=submitted))


def samples(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_queue_admissions_preemptions_rejections_states_waits_and_cost(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")
    now = time.time()
    add(store, "a1", submitted=now - 100)
    add(store, "a2", priority="high", submitted=now - 30)
    add(store, "b1", tenant="team-b", gpus=1.0, workers=2, submitted=now - 50)
    store.transition("b1", S.STARTING)
    store.transition("b1", S.RUNNING)
    store.transition("b1", S.PREEMPTING)
    store.transition("b1", S.QUEUED)
    store.transition("b1", S.STARTING)
    store.transition("b1", S.RUNNING)
    store.transition("b1", S.FAILED)
    store.save_cost(StoredCost(job_id="b1", seconds=1800, cpu_usd=0.10, gpu_usd=0.25, memory_usd=0.0,
                               usd_per_hour=0.7, metered_at=now, logged=False))
    add(store, "c1", tenant="team-b", message="")
    store.transition("c1", S.REJECTED, message="asks for 4 GPU but tenant team-b's quota is 1 GPU")
    add(store, "c2", tenant="team-b")
    store.transition("c2", S.REJECTED, message="asks for 64 CPU (8 x 8) but the cluster can give at most 2 CPU")
    store.record_preemption("b1", 1, now, cpu_s=30.0, gpu_s=60.0, drained=True)
    from ray_apps.scheduler.store import WaitRow
    store.publish_waits({"a1": WaitRow("quota", "tenant team-a quota", 1, 1, None, None, None),
                         "a2": WaitRow("behind", "behind a1", 1, 1, None, None, None)}, {}, now)
    config = QueueConfig(tenants={"team-b": {"gpus": 2, "budget_usd": 0.30}})
    heartbeat = tmp_path / "dispatcher.heartbeat"
    heartbeat.write_text('{"time": 1234.5, "last_cycle_ok": true}')
    got = samples(PlatformCollector(FakeQueue(store, config), heartbeat))

    def v(name, **labels):
        return got.get((name, tuple(sorted(labels.items()))))

    assert v("oppen_queue_depth", priority="normal", tenant="team-a") == 1
    assert v("oppen_queue_depth", priority="high", tenant="team-a") == 1
    assert v("oppen_queue_oldest_wait_seconds", priority="normal", tenant="team-a") == pytest.approx(100, abs=5)
    assert v("oppen_admissions_total", tenant="team-b", priority="normal") == 2      # two attempts
    assert v("oppen_preemptions_total", tenant="team-b", priority="normal") == 1
    assert v("oppen_preemption_lost_seconds_total", tenant="team-b", resource="gpu") == 60.0
    assert v("oppen_preemption_lost_seconds_total", tenant="team-b", resource="cpu") == 30.0
    assert v("oppen_queue_waiting", kind="quota") == 1 and v("oppen_queue_waiting", kind="behind") == 1
    assert v("oppen_jobs_finished_total", state="FAILED", tenant="team-b", trainer="mnist") == 1
    assert v("oppen_jobs", state="QUEUED", tenant="team-a", trainer="mnist") == 2
    assert v("oppen_rejections_total", reason="quota", tenant="team-b") == 1
    assert v("oppen_rejections_total", reason="capacity", tenant="team-b") == 1
    assert v("oppen_queue_wait_seconds_count") == 1        # b1's first admission, ~50 s after submission
    assert v("oppen_queue_wait_seconds_sum") == pytest.approx(50, abs=5)
    assert v("oppen_queue_wait_seconds_bucket", le="15.0") == 0 and v("oppen_queue_wait_seconds_bucket", le="60.0") == 1
    assert v("oppen_cost_usd_total", tenant="team-b", trainer="mnist") == pytest.approx(0.35)
    assert v("oppen_gpu_hours_total", tenant="team-b", trainer="mnist") == pytest.approx(1.0)  # 0.5 h x 2 x 1
    assert v("oppen_tenant_spend_month_usd", tenant="team-b") == pytest.approx(0.35)
    assert v("oppen_tenant_budget_usd", tenant="team-b") == 0.30
    assert v("oppen_dispatcher_last_cycle_timestamp_seconds") == 1234.5
    assert v("oppen_dispatcher_last_cycle_ok") == 1


def test_forecast_error_of_finished_jobs_per_trainer(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")
    now = time.time()
    for job_id, forecast, actual in (("j1", 0.11, 0.10), ("j2", 0.05, 0.10), ("j3", 0.30, None)):
        add(store, job_id)
        store.transition(job_id, S.STARTING)
        store.save_forecast(job_id, now, forecast, forecast * 0.8, forecast * 1.2)
        if actual is not None:  # j3 is still running: no metered cost, no error yet
            store.save_cost(StoredCost(job_id=job_id, seconds=60, cpu_usd=actual, gpu_usd=0.0, memory_usd=0.0,
                                       usd_per_hour=1.0, metered_at=now, logged=False))
    store.save_forecast("j1", now, 99.0, None, None)  # the first admission's forecast is the one kept
    got = samples(PlatformCollector(FakeQueue(store, QueueConfig())))
    bucket = lambda le: got[("oppen_forecast_error_ratio_bucket", (("le", le), ("trainer", "mnist")))]  # noqa: E731
    assert got[("oppen_forecast_error_ratio_count", (("trainer", "mnist"),))] == 2
    assert got[("oppen_forecast_error_ratio_sum", (("trainer", "mnist"),))] == pytest.approx(0.1 + 0.5)
    assert (bucket("0.05"), bucket("0.1"), bucket("0.5"), bucket("+Inf")) == (0, 1, 2, 2)


def test_restarting_the_exporter_changes_no_total(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")
    add(store, "x")
    store.transition("x", S.STARTING)
    queue = FakeQueue(store, QueueConfig())
    first, second = samples(PlatformCollector(queue)), samples(PlatformCollector(queue))
    assert first == second and first[("oppen_admissions_total", (("priority", "normal"), ("tenant", "team-a")))] == 1


def test_rejection_reasons_and_month_start():
    assert rejection_reason("asks for 3 GPU but tenant t's quota is 2 GPU") == "quota"
    assert rejection_reason("its 4 workers cannot be packed onto the cluster's nodes") == "packing"
    assert rejection_reason("something new") == "other"
    assert month_start(time.mktime((2026, 11, 30, 12, 0, 0, 0, 0, 0)) - time.timezone) == \
        pytest.approx(time.mktime((2026, 11, 1, 0, 0, 0, 0, 0, 0)) - time.timezone)
