"""The cost engine on the real platform: a queued MNIST job is metered, forecast
mid-run over HTTP, and its cost lands in MLflow, the store and the REST API."""

from __future__ import annotations

import time

import pytest
import requests
from mlflow.tracking import MlflowClient

from ray_apps.cluster import serve_url
from ray_apps.costs.forecast import forecast_running, tail_of
from ray_apps.costs.runs import past_runs, progress_points
from ray_apps.costs.service import CostService
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from tests.integration.conftest import QUEUE_CONFIG
from trainers.phases import PHASES

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}
# Four short epochs: long enough to forecast at 50%, short enough for the suite.
PARAMS = {"epochs": 4, "train_samples": 6000, "test_samples": 1000}


@pytest.fixture(scope="module")
def finished(platform):
    """One MNIST job through the queue, with a forecast taken over HTTP once half its epochs are done."""
    queue = Queue.from_settings(platform, QueueConfig(**QUEUE_CONFIG))
    api = serve_url(platform) + "/v1"
    job = queue.submit("mnist", PARAMS, tenant="team-a")
    mlflow = MlflowClient(platform.tracking_uri)
    midway, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline:
        job = queue.get(job.id)
        if job.state.is_terminal():
            break
        if midway is None and job.mlflow_run_id and len(progress_points(mlflow, job.mlflow_run_id)) >= 2:
            resp = requests.post(f"{api}/forecast", json={"job_id": job.id}, headers=A, timeout=30)
            assert resp.status_code == 200, resp.text
            midway = resp.json()
        time.sleep(0.25)
    assert job.state is JobState.SUCCEEDED, (job.state, job.message)
    deadline = time.monotonic() + 60
    while not queue.store.costs([job.id]).get(job.id, None) or not queue.store.costs([job.id])[job.id].logged:
        assert time.monotonic() < deadline, "the dispatcher never logged the job's cost"
        time.sleep(0.3)
    return {"queue": queue, "job": queue.get(job.id), "midway": midway, "api": api, "mlflow": mlflow}


def test_the_mlflow_run_carries_the_cost_of_allocation_times_rate_times_ray_time(finished, platform):
    job, mlflow = finished["job"], finished["mlflow"]
    info = finished["queue"].ray_client().get_job_info(job.ray_submission_id)
    ray_s = (info.end_time - info.start_time) / 1000
    metrics, tags = mlflow.get_run(job.mlflow_run_id).data.metrics, mlflow.get_run(job.mlflow_run_id).data.tags
    # 1 worker x 2 CPUs x $0.05 per core-hour (configs/costs.yaml), no GPU, memory unpriced.
    assert metrics["job_run_s"] == pytest.approx(ray_s, rel=1e-6)  # epoch seconds as floats: ~0.1 µs
    assert metrics["job_cost_usd"] == pytest.approx(2 * 0.05 * ray_s / 3600, rel=1e-6)
    assert metrics["job_cost_gpu_usd"] == 0 and metrics["job_cpu_core_hours"] == pytest.approx(2 * ray_s / 3600)
    assert tags["oppen.cost.allocation"].startswith("cpus=2 gpus=0") and tags["oppen.queue_job_id"] == job.id
    # The profile later forecasts learn from: time per epoch, fixed part and tail.
    assert 0 < metrics["job_unit_s"] < ray_s and 0 < metrics["job_tail_s"] < 30
    assert metrics["job_fixed_s"] == pytest.approx(ray_s - 4 * metrics["job_unit_s"], rel=1e-6)
    # The same figure from the store over REST.
    resp = requests.get(f"{finished['api']}/costs/{job.id}", headers=A, timeout=30)
    assert resp.status_code == 200 and resp.json()["total_usd"] == pytest.approx(metrics["job_cost_usd"])
    assert not resp.json()["live"] and resp.json()["attempts"] == 1


def test_the_run_says_where_the_job_s_time_went(finished):
    """The five phases, from the queue's times and the trainer's clock, cover submit to Ray's end."""
    job, mlflow = finished["job"], finished["mlflow"]
    info = finished["queue"].ray_client().get_job_info(job.ray_submission_id)
    metrics = mlflow.get_run(job.mlflow_run_id).data.metrics
    phases = {name: metrics[f"phase_{name}_s"] for name in PHASES}
    assert all(v >= 0 for v in phases.values()) and phases["training"] > phases["first_step"], phases
    assert sum(phases.values()) == pytest.approx(info.end_time / 1000 - job.submitted_at, abs=0.5), phases
    assert phases["starting"] > 1 and phases["finishing"] > 0  # a Ray Train job's start-up and model logging
    stored = finished["queue"].store.phases([job.id])[job.id]
    assert stored.training == pytest.approx(phases["training"], abs=1e-3)
    print("phases:", {k: round(v, 1) for k, v in phases.items()})


def test_the_forecast_at_half_way_brackets_the_final_cost(finished):
    job, mlflow, midway = finished["job"], finished["mlflow"], finished["midway"]
    final = mlflow.get_run(job.mlflow_run_id).data.metrics["job_cost_usd"]
    assert midway is not None, "the job finished before a forecast could be taken at 50%"
    assert midway["basis"] == "progress" and 0.5 <= midway["progress"] < 1.0
    # A 90% interval on a noisy 2-core box: the final cost is inside it, give or take 1% of itself
    # (a run whose last epochs ran a little faster than its first lands just below the low end).
    slack = 0.01 * final
    assert midway["total_usd_low"] - slack <= final <= midway["total_usd_high"] + slack, (midway, final)
    # Replayed exactly at 2 of 4 epochs: the same engine, as of that moment.
    a = finished["queue"].store.attempts([job.id])[job.id][0]
    pts = progress_points(mlflow, job.mlflow_run_id)[:2]
    rate = 2 * 0.05
    replay = forecast_running(points=pts, units_total=4, now=pts[-1].at, spent_s=pts[-1].at - a.started_at,
                              usd_per_hour=rate, tail=tail_of([]))
    assert replay.total_usd_low - slack <= final <= replay.total_usd_high + slack
    assert abs(replay.total_usd - final) / final < 0.25


def test_prestart_forecast_learns_from_the_metered_run(finished, platform):
    resp = requests.post(f"{finished['api']}/forecast", json={"trainer": "mnist", "params": PARAMS}, headers=A,
                         timeout=30)
    assert resp.status_code == 200, resp.text
    fc = resp.json()
    final = finished["mlflow"].get_run(finished["job"].mlflow_run_id).data.metrics["job_cost_usd"]
    assert fc["basis"] == "history" and fc["total_usd_low"] <= final <= fc["total_usd_high"], (fc, final)
    assert any(r.run_id == finished["job"].mlflow_run_id for r in past_runs(finished["mlflow"], "mnist"))
    # Twice the training data: more time per epoch on top of the same fixed part (start-up, tail
    # and each epoch's evaluation do not grow with it, so well under twice the total).
    bigger = CostService.from_settings(platform).forecast_new("mnist", {**PARAMS, "train_samples": 12000})
    assert bigger.total_usd > fc["total_usd"] * 1.2


def test_report_budget_and_recommendations_over_http(finished):
    api, job = finished["api"], finished["job"]
    report = requests.get(f"{api}/costs/report", params={"since": "1d", "by": "tenant,trainer"}, headers=A,
                          timeout=30).json()
    assert all(r["group"]["tenant"] == "team-a" for r in report["rows"])  # a tenant sees only its spend
    mnist = next(r for r in report["rows"] if r["group"]["trainer"] == "mnist")
    assert mnist["jobs"] >= 1 and mnist["total_usd"] >= job_cost(api, job.id)
    budget = requests.get(f"{api}/costs/budget", params={"budget_usd": 1e-6, "since": "1d"}, headers=A,
                          timeout=30).json()
    assert budget["status"] == "over" and budget["spent_usd"] >= job_cost(api, job.id)
    recs = requests.get(f"{api}/recommendations/{job.mlflow_run_id}", headers=A, timeout=30)
    assert recs.status_code == 200 and all(r["saving_usd"] > 0 for r in recs.json()["recommendations"])


def job_cost(api, job_id):
    return requests.get(f"{api}/costs/{job_id}", headers=A, timeout=30).json()["total_usd"]


@pytest.mark.parametrize("method,path,body,params,status,reason", [
    ("get", "/costs/no-such-job", None, None, 404, "no job 'no-such-job'"),
    ("post", "/forecast", {"job_id": "no-such-job"}, None, 404, "no job"),
    ("post", "/forecast", {}, None, 422, "either a job_id"),
    ("post", "/forecast", {"job_id": "x", "trainer": "mnist"}, None, 422, "either a job_id"),
    ("post", "/forecast", {"trainer": "resnet"}, None, 422, "unknown trainer 'resnet'"),
    ("post", "/forecast", {"trainer": "mnist", "params": {"epochs": 0}}, None, 422, "--epochs must be at least 1"),
    ("get", "/costs/report", None, {"since": "last tuesday"}, 422, "expected a duration"),
    ("get", "/costs/report", None, {"by": "colour"}, 422, "cannot group by colour"),
    ("get", "/costs/budget", None, {"budget_usd": -1}, 422, "positive amount"),
    ("get", "/recommendations/0123456789abcdef", None, None, 404, "no MLflow run"),
])
def test_bad_cost_requests_are_4xx_naming_the_problem(finished, method, path, body, params, status, reason):
    resp = getattr(requests, method)(finished["api"] + path, json=body, params=params, headers=A, timeout=30)
    assert resp.status_code == status, resp.text
    assert reason in resp.json()["detail"]["reason"]


def test_finished_and_foreign_jobs(finished):
    api, job = finished["api"], finished["job"]
    resp = requests.post(f"{api}/forecast", json={"job_id": job.id}, headers=A, timeout=30)
    assert resp.status_code == 409 and "SUCCEEDED: nothing left to forecast" in resp.json()["detail"]["reason"]
    assert requests.get(f"{api}/costs/{job.id}", headers=B, timeout=30).status_code == 404
    assert requests.get(f"{api}/recommendations/{job.mlflow_run_id}", headers=B, timeout=30).status_code == 404
