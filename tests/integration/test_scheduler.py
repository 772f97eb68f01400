"""The queue and dispatcher on a real local Ray head with 2 CPUs and 2 logical GPUs.

Jobs are `trainers.probe`: real Ray jobs that hold a gang (a placement group) for a
few seconds and checkpoint their progress, so the scheduling is what takes time.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from ray_apps.processes import ServiceRegistry
from ray_apps.scheduler.api import Infeasible, Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.dispatcher import Dispatcher
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import InvalidTransition
from tests.integration.conftest import QUEUE_CONFIG, job_logs

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
    resumed = job_logs(queue.settings, jobs[victim].ray_submission_id)
    start_s = float(resumed.split("start_s=")[1].split()[0])
    assert start_s >= 2  # continued from the checkpoint, not from zero


def test_cancel_queued_and_running(queue, dispatcher):
    running = probe(queue, seconds=30, gpus=2)
    waiting = probe(queue, seconds=1, gpus=2)
    deadline = time.monotonic() + 60
    while queue.get(running).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.3)
    assert queue.cancel(waiting).state is JobState.CANCELLED
    assert queue.cancel(running).state is JobState.CANCELLED
    client = queue._ray()
    deadline = time.monotonic() + 30
    while client.get_job_status(queue.get(running).ray_submission_id).value != "STOPPED":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(1)
    assert queue.get(running).state is JobState.CANCELLED  # the dispatcher did not overwrite it
    assert queue.get(waiting).ray_submission_id is None     # never reached Ray


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
    assert [j.submission_id for j in queue._ray().list_jobs()].count(job_id) == 1


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
    submitted = [j.submission_id for j in queue._ray().list_jobs() if j.submission_id in ids]
    assert sorted(submitted) == sorted(ids)  # each job reached Ray exactly once
    assert dispatcher.children()  # and the supervisor brought the dispatcher back
