"""The queue and dispatcher on a real local Ray head with 2 CPUs and 2 logical GPUs.

Jobs are `trainers.probe`: real Ray jobs that hold a gang (a placement group) for a
few seconds and checkpoint their progress, so the scheduling is what takes time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ray_apps.costs.meter import Meter
from ray_apps.processes import ServiceRegistry
from ray_apps.scheduler.api import Infeasible, Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.dispatcher import Dispatcher
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import InvalidTransition
from tests.integration.conftest import QUEUE_CONFIG, job_logs, wait_for_log
from trainers.pricing import load_catalog

pytestmark = pytest.mark.slow

@pytest.fixture()
def queue(platform):
    q = Queue.from_settings(platform, QueueConfig(**QUEUE_CONFIG))
    for job in q.list(states=[JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.PREEMPTING]):
        q.cancel(job.id)  # a clean queue per test
    return q


@pytest.fixture()
def dispatcher(platform):
    """The dispatcher `oppen up` started (under its supervisor), as a psutil.Process."""
    svc = ServiceRegistry(platform.state_dir).running()["dispatcher"]
    deadline = time.monotonic() + 30
    while not psutil.Process(svc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.2)
    return psutil.Process(svc.pid)


def wait_all_done(queue, ids, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [queue.get(i) for i in ids]
        if all(j.state.is_terminal() for j in jobs):
            return {j.id: j for j in jobs}
        time.sleep(0.5)
    raise AssertionError({i: queue.get(i).state.value for i in ids})


def wait_metered(queue, job_id, timeout=30):
    """The job's cost once the dispatcher has settled it."""
    deadline = time.monotonic() + timeout
    while job_id not in queue.store.costs([job_id]):
        assert time.monotonic() < deadline, f"{job_id} not metered after {timeout} s"
        time.sleep(0.3)
    return Meter(queue.store, load_catalog(queue.settings.costs_file)).cost_of(queue.get(job_id))


def probe(queue, seconds=3, gpus=1, priority="normal", tenant="team-b", workers=1):
    return queue.submit("probe", {"seconds": seconds, "gpus_per_worker": gpus, "num_workers": workers},
                        priority=priority, tenant=tenant).id


def test_infeasible_request_is_rejected_at_once_with_the_reason(queue):
    t0 = time.monotonic()
    with pytest.raises(Infeasible, match=r"asks for 3 GPU \(1 x 3\) but the cluster can give at most 2 GPU"):
        probe(queue, gpus=3)
    assert time.monotonic() - t0 < 5
    assert queue.list(states=[JobState.REJECTED])[-1].message.startswith("asks for 3 GPU")
    with pytest.raises(Infeasible, match="tenant team-a's quota is 2 GPU"):
        probe(queue, gpus=1, workers=3, tenant="team-a")


def test_gang_priority_order_and_gpu_accounting(queue, dispatcher):
    blocker = probe(queue, seconds=4, gpus=2, priority="high")  # both GPUs; high: nothing preempts it
    time.sleep(1.5)
    low = probe(queue, priority="low")
    normal = probe(queue, priority="normal")
    high = probe(queue, priority="high")
    jobs = wait_all_done(queue, [blocker, low, normal, high])
    assert all(j.state is JobState.SUCCEEDED for j in jobs.values()), {j.id: j.message for j in jobs.values()}
    b, lo, n, h = (jobs[i] for i in (blocker, low, normal, high))
    # Nothing else ran beside the 2-GPU gang; then high and normal together; low last (CPUs full).
    assert min(lo.started_at, n.started_at, h.started_at) >= b.ended_at - 1.0
    assert max(h.started_at, n.started_at) <= lo.started_at
    assert lo.started_at >= min(h.ended_at, n.ended_at) - 1.0


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(queue, dispatcher):
    victim = probe(queue, seconds=12, gpus=2, priority="low")
    deadline = time.monotonic() + 60
    while queue.get(victim).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(3)  # let it make progress worth resuming
    urgent = probe(queue, seconds=2, gpus=1, priority="high")
    jobs = wait_all_done(queue, [victim, urgent])
    assert jobs[victim].state is JobState.SUCCEEDED and jobs[urgent].state is JobState.SUCCEEDED
    states = [e.to_state for e in queue.store.events(victim)]
    assert "PREEMPTING" in states and states.count("STARTING") == 2 and jobs[victim].attempt == 2
    assert jobs[urgent].started_at < jobs[victim].ended_at
    # Asked to drain, it checkpointed and exited by itself, well inside its grace (no stop_job).
    first = job_logs(queue.settings, victim)
    assert "drained at" in first, first[-2000:]
    (lost,) = [p for p in queue.store.preemptions() if p["job_id"] == victim]
    assert lost["drained"] == 1 and lost["gpu_s_lost"] < 2 * 3  # at most the second since its last checkpoint
    events = {e.to_state: e.at for e in queue.store.events(victim)}
    requeued = [e.at for e in queue.store.events(victim) if e.from_state == "PREEMPTING"][0]
    assert requeued - events["PREEMPTING"] < 20
    resumed = job_logs(queue.settings, jobs[victim].ray_submission_id)
    start_s = float(resumed.split("start_s=")[1].split()[0])
    assert start_s >= 2  # continued from the checkpoint, not from zero
    # Charged for both attempts as Ray timed them, not for the wait in between.
    client = queue.ray_client()
    ray_s = sum((i.end_time - i.start_time) / 1000 for i in (client.get_job_info(victim),
                                                              client.get_job_info(f"{victim}-r2")))
    cost = wait_metered(queue, victim)
    assert cost.attempts == 2 and cost.seconds == pytest.approx(ray_s, rel=1e-6)
    assert cost.gpu_usd == pytest.approx(2 * 0.25 * ray_s / 3600, rel=1e-6)  # 2 GPUs at the catalog's $0.25/h


def test_cancel_queued_and_running(queue, dispatcher):
    running = probe(queue, seconds=30, gpus=2)
    waiting = probe(queue, seconds=1, gpus=2)
    deadline = time.monotonic() + 60
    while queue.get(running).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.3)
    assert queue.cancel(waiting).state is JobState.CANCELLED
    assert queue.cancel(running).state is JobState.CANCELLED
    client = queue.ray_client()
    deadline = time.monotonic() + 30
    while client.get_job_status(queue.get(running).ray_submission_id).value != "STOPPED":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(1)
    assert queue.get(running).state is JobState.CANCELLED  # the dispatcher did not overwrite it
    assert queue.get(waiting).ray_submission_id is None     # never reached Ray
    # Charged from Ray's start to (about) its stop; the job that never ran costs nothing.
    info = client.get_job_info(queue.get(running).ray_submission_id)
    assert wait_metered(queue, running).seconds == pytest.approx((info.end_time - info.start_time) / 1000, abs=3)
    assert Meter(queue.store, load_catalog(queue.settings.costs_file)).cost_of(queue.get(waiting)).total_usd == 0


def test_crash_between_admission_and_submit_is_repaired_once(queue, dispatcher):
    job_id = probe(queue, seconds=1, gpus=1)
    # As if a dispatcher died right after recording STARTING, before submit_job: a
    # second dispatcher in this process races the running one to repair it.
    try:
        queue.store.transition(job_id, JobState.STARTING, expect=JobState.QUEUED, attempt=1,
                               ray_submission_id=job_id)
    except InvalidTransition:
        pytest.skip("the running dispatcher admitted the job first")
    d = Dispatcher(queue)
    d.cycle()
    d.cycle()
    assert wait_all_done(queue, [job_id])[job_id].state is JobState.SUCCEEDED
    assert [j.submission_id for j in queue.ray_client().list_jobs()].count(job_id) == 1


def test_dispatcher_killed_mid_queue_comes_back_and_runs_each_job_once(queue, dispatcher):
    ids = [probe(queue, seconds=2, gpus=1) for _ in range(5)]
    kills = 0
    deadline = time.monotonic() + 120
    while kills < 2 and time.monotonic() < deadline:
        children = dispatcher.children()
        if children and any(queue.get(i).state is JobState.RUNNING for i in ids):
            children[0].send_signal(signal.SIGKILL)
            kills += 1
            time.sleep(2)
        time.sleep(0.2)
    assert kills == 2
    jobs = wait_all_done(queue, ids)
    assert all(j.state is JobState.SUCCEEDED for j in jobs.values())
    submitted = [j.submission_id for j in queue.ray_client().list_jobs() if j.submission_id in ids]
    assert sorted(submitted) == sorted(ids)  # each job reached Ray exactly once
    assert dispatcher.children()  # and the supervisor brought the dispatcher back


def test_quota_holds_a_tenant_back_while_others_use_the_free_gpu(queue, dispatcher):
    first = probe(queue, seconds=4, gpus=1, tenant="team-c")   # team-c may hold 1 GPU at a time
    second = probe(queue, seconds=1, gpus=1, tenant="team-c")
    other = probe(queue, seconds=1, gpus=1, tenant="team-b")
    jobs = wait_all_done(queue, [first, second, other])
    assert all(j.state is JobState.SUCCEEDED for j in jobs.values())
    assert jobs[second].started_at >= jobs[first].ended_at - 1.0        # waited for its own quota
    assert jobs[other].started_at < jobs[first].ended_at               # while team-b used the free GPU


def test_validation_and_gpu_availability(queue):
    ok = queue.validate("mnist", {"epochs": 1, "num_workers": 2, "cpus_per_worker": 1})
    assert ok.ok and ok.cpus == 2 and 0.7 < ok.memory_per_worker_gib < 0.8
    too_big = queue.validate("probe", {"num_workers": 1, "gpus_per_worker": 3})
    assert not too_big.ok and "asks for 3 GPU" in too_big.reason
    gpus = queue.gpu_availability()
    assert gpus.total == 2 and sum(n["total"] for n in gpus.by_node.values()) == 2
    assert all(n["type"] == "logical" for n in gpus.by_node.values())


def test_cli_queue_commands(queue, dispatcher):
    env = {**os.environ}
    oppen = [sys.executable, "-m", "ray_apps.cli"]
    out = subprocess.run([*oppen, "queue", "submit", "probe", "--seconds", "30", "--gpus-per-worker", "1",
                          "--priority", "low", "--tenant", "team-b"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1]
    listed = subprocess.run([*oppen, "queue", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert job_id in listed.stdout and "low" in listed.stdout
    gpus = subprocess.run([*oppen, "gpus"], capture_output=True, text=True, env=env, timeout=60)
    assert "total" in gpus.stdout and gpus.returncode == 0
    cancelled = subprocess.run([*oppen, "queue", "cancel", job_id], capture_output=True, text=True, env=env,
                               timeout=60)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
    again = subprocess.run([*oppen, "queue", "cancel", job_id], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "already CANCELLED" in again.stderr and "Traceback" not in again.stderr
    infeasible = subprocess.run([*oppen, "queue", "submit", "probe", "--gpus-per-worker", "4"], capture_output=True,
                                text=True, env=env, timeout=60)
    assert infeasible.returncode == 2 and "asks for 4 GPU" in infeasible.stderr


def test_ray_head_restart_keeps_every_job_exactly_once(platform, queue, dispatcher):
    from ray_apps import cluster, processes

    lost = probe(queue, seconds=15, gpus=2)     # running when the head goes down
    waiting = probe(queue, seconds=1, gpus=1)   # still queued then
    deadline = time.monotonic() + 60
    while queue.get(lost).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.3)
    # Its checkpoint is past 3 s when the head goes (Ray's RUNNING is the driver's start, not the probe's).
    wait_for_log(platform, queue.get(lost).ray_submission_id, "3/15 s", timeout=60)
    processes.stop(ServiceRegistry(platform.state_dir).running()["ray"])
    down_at = time.time()
    cluster.up(platform, timeout=120, say=lambda s: None)  # a fresh head: Ray's job table is empty
    jobs = wait_all_done(queue, [lost, waiting], timeout=300)
    # The lost attempt is billed to the last moment Ray reported it running, not to when the
    # dispatcher noticed the new head (tens of seconds later).
    first = next(a for a in queue.store.attempts([lost])[lost] if a.attempt == 1)
    assert first.ended_at <= down_at + 1, (first, down_at)
    assert jobs[lost].state is JobState.SUCCEEDED and jobs[waiting].state is JobState.SUCCEEDED
    assert jobs[lost].attempt == 2
    assert any("head restarted" in e.message for e in queue.store.events(lost))
    assert [j.id for j in queue.list()].count(lost) == 1
    on_new_head = [j.submission_id for j in queue.ray_client().list_jobs()]
    assert on_new_head.count(f"{lost}-r2") == 1 and lost not in on_new_head
    resumed = job_logs(platform, f"{lost}-r2")
    assert float(resumed.split("start_s=")[1].split()[0]) >= 2  # resumed from its checkpoint


def test_a_cancel_racing_admission_never_leaves_a_job_running_in_ray(queue, platform):
    """50 jobs, each cancelled at a different moment around its admission (queued, being admitted,
    submitted, starting, running). Whatever the order, none runs on in Ray under a CANCELLED record."""
    from ray.job_submission import JobSubmissionClient

    ids = []
    for i in range(50):
        job = probe(queue, seconds=30, gpus=0, tenant="team-race")  # its own tenant: 50 within the rate limit
        time.sleep((i % 10) * 0.12)  # 0 to 1.1 s: both sides of the dispatcher's admission
        assert queue.cancel(job).state is JobState.CANCELLED
        ids.append(job)
    client = JobSubmissionClient(platform.dashboard_url)
    mine = set(ids)

    def live_in_ray():
        return [j.submission_id for j in client.list_jobs()
                if (j.metadata or {}).get("queue_job_id") in mine and j.status.value in ("PENDING", "RUNNING")]

    deadline = time.monotonic() + 60
    while (left := live_in_ray()) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == [], left
    assert all(queue.get(i).state is JobState.CANCELLED for i in ids)
    submitted = [i for i in ids if queue.get(i).ray_submission_id]
    print(f"{len(submitted)} of 50 reached admission before their cancel; none left running")


def test_a_stalled_mlflow_holds_back_only_the_jobs_that_need_it_and_the_api_says_so(queue, platform):
    """MLflow frozen (SIGSTOP, as a hung server): an MNIST job that logs to it waits, a probe that needs
    no MLflow runs past it, and the models API answers 503 "MLflow is unavailable" instead of hanging."""
    import requests

    from ray_apps.cluster import serve_url

    # The models ingress starts on its first request (serve_on_demand): up before MLflow freezes, so
    # the 5 s below measure the answer, not the replica's start.
    assert requests.get(f"{serve_url(platform)}/v1/models/health", timeout=120).status_code == 200
    mlflow = ServiceRegistry(platform.state_dir).running()["mlflow"].processes()
    for proc in mlflow:
        proc.suspend()
    try:
        t0 = time.monotonic()
        resp = requests.get(f"{serve_url(platform)}/v1/models/", headers={"Authorization": "Bearer token-a"},
                            timeout=30)
        assert resp.status_code == 503 and "MLflow is unavailable" in resp.json()["detail"]["reason"], resp.text
        assert time.monotonic() - t0 < 5
        mnist = queue.submit("mnist", {"epochs": 1, "train_samples": 256, "test_samples": 64},
                             priority="high", tenant="team-b").id  # both CPUs, first in line
        quick = probe(queue, seconds=1, gpus=0, tenant="team-b")
        done = wait_all_done(queue, [quick], timeout=90)
        assert done[quick].state is JobState.SUCCEEDED
        assert queue.get(mnist).state is JobState.QUEUED
    finally:
        for proc in mlflow:
            proc.resume()
    queue.cancel(mnist)
