"""The agent end to end over real HTTP on the local Ray Serve: one conversation that
starts a job, asks its status and what it has cost, and cancels it."""

from __future__ import annotations

import time

import pytest
import requests

from ray_apps.cluster import serve_url
from ray_apps.processes import wait_until
from ray_apps.scheduler.api import Queue

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}


@pytest.fixture()
def agent_url(platform):
    return serve_url(platform) + "/v1/agent"


def say(url, message, thread, headers=A):
    resp = requests.post(url, json={"message": message, "thread_id": thread}, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_train_then_status_then_cost_then_cancel_in_one_thread(agent_url, platform):
    thread = f"conv-{time.time_ns()}"
    keyed = {**A, "Idempotency-Key": thread}
    started = say(agent_url, "please train mnist for 3 epochs on 1000 samples", thread, keyed)
    call = started["tool_calls"][0]
    assert call["name"] == "trigger_training_job" and call["args"]["params"] == {"epochs": 3, "train_samples": 1000}
    job_id = call["result"]["id"]
    assert job_id in started["answer"] and call["result"]["tenant"] == "team-a"
    # A client that lost the answer asks again with its key: the same job, not a second one.
    retried = say(agent_url, "please train mnist for 3 epochs on 1000 samples", f"{thread}-retry", keyed)
    assert retried["tool_calls"][0]["result"]["id"] == job_id

    status = say(agent_url, "how is it doing?", thread)
    assert status["tool_calls"][0]["name"] == "get_training_status"
    assert status["tool_calls"][0]["result"]["id"] == job_id

    # What it has cost so far: metered live once the dispatcher has seen it run in Ray, no need
    # to wait for the end.
    queue = Queue.from_settings(platform)
    deadline = time.monotonic() + 120
    while (job := queue.get(job_id)).state.value != "RUNNING":
        assert time.monotonic() < deadline and not job.state.is_terminal(), (job.state, job.message)
        time.sleep(0.5)
    time.sleep(2)
    cost = say(agent_url, "and what has it cost so far?", thread)
    call = cost["tool_calls"][0]
    assert call["name"] == "calculate_training_cost" and call["args"] == {"job_id": job_id}
    assert call["result"]["live"] and call["result"]["total_usd"] > 0
    assert f"${call['result']['total_usd']:.4f}" in cost["answer"]

    # "it" is still that job: cancelling stops it in Ray (~40 s of a 3-epoch job were left).
    cancelled = say(agent_url, "ok, cancel it", thread)
    call = cancelled["tool_calls"][0]
    assert call["name"] == "cancel_job" and call["args"] == {"job_id": job_id}
    assert call["result"] == {"cancelled": [job_id], "refused": []}
    job = queue.get(job_id)
    assert job.state.value == "CANCELLED"
    ray_jobs = queue.ray_client()
    assert wait_until(lambda: ray_jobs.get_job_status(job.ray_submission_id).is_terminal(), timeout=60), \
        "Ray never stopped the cancelled job"
    assert ray_jobs.get_job_status(job.ray_submission_id).value == "STOPPED"

    # Another tenant using the same thread id gets its own, empty thread: "it" means nothing there.
    other = say(agent_url, "and what did it cost?", thread, headers=B)
    assert all(c["args"].get("job_id") != job_id for c in other["tool_calls"])


def test_agent_http_guards(agent_url):
    assert requests.post(agent_url, json={"message": "hi"}, timeout=30).status_code == 401
    assert requests.post(agent_url, json={"message": "x" * 5000}, headers=A, timeout=30).status_code == 413
    assert requests.post(agent_url, json={"message": "hi", "thread_id": "../etc"}, headers=A,
                         timeout=30).status_code == 422
    assert requests.post(agent_url, json={"message": ""}, headers=A, timeout=30).status_code == 422
    big = requests.post(agent_url, data=b"{" + b" " * 70_000 + b"}", headers={**A, "content-type": "application/json"},
                        timeout=30)
    assert big.status_code == 413
    refused = say(agent_url, "train probe for 5 seconds", "guards")
    assert refused["tool_calls"] == [] and "Which trainer" in refused["answer"]
    declined = say(agent_url, "delete all files on the server", "guards2")
    assert declined["tool_calls"] == [] and "I can help with" in declined["answer"]


def test_the_routes_answer_without_a_trailing_slash_and_with_one(agent_url, platform):
    # Python's urllib and many SDKs do not re-send a POST after a 307: the route must answer itself.
    for url in (agent_url, agent_url + "/"):
        resp = requests.post(url, json={"message": "what GPUs are free?"}, headers=A, timeout=60,
                             allow_redirects=False)
        assert resp.status_code == 200, (url, resp.status_code, resp.text)
        assert resp.json()["tool_calls"][0]["name"] == "get_gpu_availability"
    for url in (serve_url(platform) + "/v1/models", serve_url(platform) + "/v1/models/"):
        resp = requests.get(url, headers=A, timeout=30, allow_redirects=False)
        assert resp.status_code == 200 and isinstance(resp.json(), list), (url, resp.status_code, resp.text)
