"""A real Prometheus (Debian's, started by `oppen up` on the test ports) scrapes the local
platform while a short job runs: the platform's metrics arrive with the right labels and values."""
import time

import pytest
import requests

from ray_apps import cluster
from ray_apps.observability import prometheus
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from tests.integration.conftest import QUEUE_CONFIG

pytestmark = pytest.mark.slow


def query(settings, expr: str) -> list[dict]:
    resp = requests.get(f"{prometheus.url(settings)}/api/v1/query", params={"query": expr}, timeout=10)
    resp.raise_for_status()
    return resp.json()["data"]["result"]


def wait_for(settings, expr: str, check, timeout: float = 60):
    deadline, result = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        result = query(settings, expr)
        if check(result):
            return result
        time.sleep(1)
    raise AssertionError(f"{expr} -> {result} after {timeout} s")


def test_prometheus_scrapes_the_platform_while_a_job_runs(platform):
    if prometheus.binary(platform) is None:
        pytest.skip("no prometheus binary (Debian: `apt-get install prometheus`; .ci/run installs it)")
    assert any(r.name == "prometheus" and r.healthy for r in cluster.status(platform))
    wait_for(platform, 'up{job="oppen"}', lambda r: r and r[0]["value"][1] == "1")
    wait_for(platform, 'up{job="ray"}', lambda r: r and r[0]["value"][1] == "1")
    before = query(platform, 'sum(oppen_admissions_total{tenant="team-c"})')
    before = float(before[0]["value"][1]) if before else 0.0
    gpu_hours_before = query(platform, 'oppen_gpu_hours_total{tenant="team-c", trainer="probe"}')
    gpu_hours_before = float(gpu_hours_before[0]["value"][1]) if gpu_hours_before else 0.0

    queue = Queue.from_settings(platform, QueueConfig(**QUEUE_CONFIG))
    job = queue.submit("probe", {"seconds": 12, "gpus_per_worker": 1, "num_workers": 1}, tenant="team-c",
                       priority="high")
    # While it runs: one RUNNING job of team-c's probe, one more admission.
    wait_for(platform, 'oppen_jobs{state="RUNNING", tenant="team-c", trainer="probe"}',
             lambda r: r and float(r[0]["value"][1]) >= 1)
    admitted = wait_for(platform, 'sum(oppen_admissions_total{tenant="team-c", priority="high"})',
                        lambda r: r and float(r[0]["value"][1]) >= before + 1)
    assert float(admitted[0]["value"][1]) == before + 1

    deadline = time.monotonic() + 120
    while not queue.get(job.id).state.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert queue.get(job.id).state is JobState.SUCCEEDED
    # Once metered: its cost and GPU-hours by tenant and trainer, and the final state.
    wait_for(platform, 'oppen_jobs_finished_total{state="SUCCEEDED", tenant="team-c", trainer="probe"}',
             lambda r: r and float(r[0]["value"][1]) >= 1)
    cost = wait_for(platform, 'oppen_cost_usd_total{tenant="team-c", trainer="probe"}',
                    lambda r: r and float(r[0]["value"][1]) > 0)
    gpu_hours = query(platform, 'oppen_gpu_hours_total{tenant="team-c", trainer="probe"}')
    # 1 GPU for the job's metered Ray time (start to end as Ray reports it), at least the probe's 12 s.
    ray_s = queue.store.costs([job.id])[job.id].seconds
    assert ray_s >= 12
    assert float(gpu_hours[0]["value"][1]) - gpu_hours_before == pytest.approx(ray_s / 3600, rel=0.02)
    assert float(cost[0]["value"][1]) > 0
    waits = query(platform, "oppen_queue_wait_seconds_count")
    assert waits and float(waits[0]["value"][1]) >= 1
    # The alert rules are loaded and evaluated by this Prometheus.
    rules = requests.get(f"{prometheus.url(platform)}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} == {"OppenDispatcherDown", "OppenQueueStuck",
                                                              "OppenJobFailed", "OppenTenantOverBudget"}
