"""The dispatcher on the new policy, on a real SQLite store: budgets at admission, why-pending
published for `queue why`, drain-then-stop preemption and the work it lost. Ray's job API,
its GCS and MLflow are the thin fakes below (the integration tests run them for real)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import yaml

from ray_apps import cli
from ray_apps.config import Settings
from ray_apps.ray_client import Resources
from ray_apps.scheduler import dispatcher as dispatcher_module
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.capacity import Capacity
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from trainers import drain


class FakeRay:
    """Ray's job list as the dispatcher reads it: every job it was handed, in the state set here."""

    def __init__(self):
        self.status: dict[str, str] = {}
        self.stopped: list[str] = []

    def list_jobs(self):
        now_ms = time.time() * 1000
        return [SimpleNamespace(submission_id=sid, status=SimpleNamespace(value=st), start_time=now_ms - 100_000,
                                end_time=None if st in ("PENDING", "RUNNING") else now_ms, message="",
                                metadata={}, entrypoint="") for sid, st in self.status.items()]

    def stop_job(self, sid):
        self.stopped.append(sid)


def node(cpu_free, cpu_total=4.0, gpu_free=0.0, gpu_total=0.0) -> Capacity:
    res = Resources(total={"CPU": cpu_total, "GPU": gpu_total},
                    used={"CPU": cpu_total - cpu_free, "GPU": gpu_total - gpu_free},
                    by_node={"n1": {"CPU": (cpu_total - cpu_free, cpu_total), "GPU": (gpu_total - gpu_free, gpu_total)}})
    return Capacity(res)


@pytest.fixture()
def make(tmp_path, monkeypatch):
    monkeypatch.setattr(Queue, "max_nodes", lambda self: [{"CPU": 4.0, "GPU": 0.0}])
    monkeypatch.setattr(dispatcher_module, "mlflow_healthy", lambda *a, **kw: True)
    monkeypatch.setattr(dispatcher_module, "create_run", lambda *a, **kw: ("run-1", None))
    ray = FakeRay()
    monkeypatch.setattr(dispatcher_module, "submit_entrypoint",
                        lambda settings, sid, entrypoint, meta, **kw: ray.status.__setitem__(sid, "RUNNING"))
    monkeypatch.setattr(dispatcher_module.Dispatcher, "_forecast_later", lambda self, ids: None)

    def build(config: dict, capacity: Capacity):
        settings = Settings(data_dir=tmp_path / "data", cluster_file="configs/cluster.single-head.yaml")
        queue = Queue.from_settings(settings, QueueConfig(**config))
        queue.capacity = lambda: capacity
        d = dispatcher_module.Dispatcher(queue)
        d._client = ray
        return queue, d, ray
    return build


CPU_JOB = {"epochs": 1, "num_workers": 1, "cpus_per_worker": 1}


def test_budgets_wait_for_a_forecast_wait_for_spend_and_reject_a_job_over_the_whole_budget(make):
    queue, d, _ = make({"tenants": {"team-a": {"budget_usd": 1.0}}, "poll_s": 0.1}, node(4))
    cheap, dear, huge = (queue.submit("mnist", CPU_JOB, tenant="team-a") for _ in range(3))
    d.cycle()
    assert queue.why(cheap.id).kind == "budget" and "no cost forecast" in queue.why(cheap.id).reason
    now = time.time()
    queue.store.save_forecast(cheap.id, now, 0.5, 0.4, 0.6, run_s_low=50, run_s_high=70)
    queue.store.save_forecast(dear.id, now, 0.5, 0.4, 0.6, run_s_low=50, run_s_high=70)
    queue.store.save_forecast(huge.id, now, 2.0, 1.5, 2.5, run_s_low=50, run_s_high=70)
    report = d.cycle()
    assert report.admitted == [cheap.id] and report.rejected == [huge.id]
    assert "alone exceeds" in queue.get(huge.id).message
    why = queue.why(dear.id)   # $0.60 committed by the running job + $0.60 > $1
    assert why.kind == "budget" and "$0.6000" in why.reason
    # An admin lets it past; it is admitted next cycle and the override is audited.
    queue.allow_over_budget(dear.id)
    d.inputs.invalidate()
    assert d.cycle().admitted == [dear.id]
    assert [r["action"] for r in queue.audit.export()].count("job.budget_override") == 1


def test_why_gives_the_kind_the_position_in_the_class_and_an_estimated_start(make, tmp_path, capsys):
    queue, d, ray = make({"poll_s": 0.1}, node(0))
    jobs = [queue.submit("mnist", CPU_JOB, tenant="team-a", priority="normal") for _ in range(3)]
    queue.store.transition(jobs[0].id, JobState.STARTING, ray_submission_id=jobs[0].id, attempt=1)
    queue.store.transition(jobs[0].id, JobState.RUNNING, started_at=time.time() - 10)
    ray.status[jobs[0].id] = "RUNNING"
    # The running job holds all 4 CPUs... for 100-300 s more; each waiting one runs 60-120 s.
    queue.store.save_forecast(jobs[0].id, time.time(), 1, 1, 1, run_s_low=110, run_s_high=310)
    for j in jobs[1:]:
        queue.store.save_forecast(j.id, time.time(), 1, 1, 1, run_s_low=60, run_s_high=120)
    queue.capacity = lambda: node(0)
    d.cycle()
    first, second = queue.why(jobs[1].id), queue.why(jobs[2].id)
    assert (first.kind, first.position, first.of) == ("capacity", 1, 2)
    assert second.kind == "behind" and jobs[1].id in second.reason and second.position == 2
    low, mid, high = first.start_in_s
    assert 90 <= low <= 110 and 290 <= high <= 310 and low < mid < high
    assert "estimated start: in about" in first.text()
    # A job that runs says so; an unknown one is a 404-kind error for its tenant.
    assert queue.why(jobs[0].id).kind == "running"
    with pytest.raises(Exception, match="no job"):
        queue.why(jobs[1].id, tenant="team-b")
    # The same answer from the CLI, and an admin's override from it too.
    config = tmp_path / "platform.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(queue.settings.data_dir)}))
    assert cli.main(["--config", str(config), "queue", "why", jobs[2].id]) == 0
    out = capsys.readouterr().out
    assert f"{jobs[2].id} waits (behind)" in out and "position 2 of 2 queued normal jobs" in out
    assert cli.main(["--config", str(config), "queue", "allow-over-budget", jobs[2].id]) == 0
    assert queue.get(jobs[2].id).over_budget == 1


def test_a_victim_is_asked_to_drain_then_stopped_after_the_grace_and_its_lost_work_recorded(make, monkeypatch):
    asked, checkpoint = [], {}
    monkeypatch.setattr(drain, "request_drain", lambda gcs, sid, at: asked.append(sid))
    monkeypatch.setattr(drain, "checkpoint_records", lambda gcs, sids: {s: checkpoint[s] for s in sids
                                                                         if s in checkpoint})
    monkeypatch.setattr(drain, "last_checkpoints", lambda gcs, sids: {s: checkpoint[s].at for s in sids
                                                                       if s in checkpoint})
    monkeypatch.setattr(drain, "clear", lambda gcs, sid: checkpoint.pop(sid, None))
    config = {"priorities": {"high": {"rank": 2, "preempt_after_s": 0}, "low": {"rank": 0}},
              "default_priority": "low", "preemption": {"drain_grace_s": 30}, "poll_s": 0.1}
    queue, d, ray = make(config, node(0))
    victim = queue.submit("mnist", {**CPU_JOB, "cpus_per_worker": 4}, tenant="team-a", priority="low")
    queue.store.transition(victim.id, JobState.STARTING, ray_submission_id=victim.id, attempt=1)
    started = time.time() - 100
    queue.store.transition(victim.id, JobState.RUNNING, started_at=started)
    ray.status[victim.id] = "RUNNING"
    checkpoint[victim.id] = drain.CheckpointRecord(at=started + 60, epoch=1, step=0)
    queue.submit("mnist", CPU_JOB, tenant="team-a", priority="high")
    report = d.cycle()
    assert report.preempted == [victim.id] and asked == [victim.id] and ray.stopped == []
    d.cycle()                                             # inside the grace: not stopped
    assert ray.stopped == [] and queue.get(victim.id).state is JobState.PREEMPTING
    # The trainer drains: a checkpoint now, exit 75 -> Ray says FAILED; the job is requeued.
    checkpoint[victim.id] = drain.CheckpointRecord(at=time.time() - 1, epoch=1, step=7, drained=True)
    ray.status[victim.id] = "FAILED"
    d.cycle()
    assert queue.get(victim.id).state in (JobState.QUEUED, JobState.STARTING)
    (lost,) = queue.store.preemptions()
    # Only the second since the drained checkpoint is lost (4 CPUs x ~1 s), not the 40 s since the last one.
    assert lost["drained"] == 1 and 0 < lost["cpu_s_lost"] < 4 * 5 and lost["gpu_s_lost"] == 0
    assert ray.stopped == []


def test_a_victim_that_does_not_drain_is_stopped_once_its_grace_is_over(make, monkeypatch):
    monkeypatch.setattr(drain, "request_drain", lambda gcs, sid, at: None)
    config = {"priorities": {"high": {"rank": 2, "preempt_after_s": 0}, "low": {"rank": 0}},
              "default_priority": "low", "preemption": {"drain_grace_s": 30}, "poll_s": 0.1}
    queue, d, ray = make(config, node(0))
    victim = queue.submit("mnist", {**CPU_JOB, "cpus_per_worker": 4}, tenant="team-a", priority="low")
    queue.store.transition(victim.id, JobState.STARTING, ray_submission_id=victim.id, attempt=1)
    queue.store.transition(victim.id, JobState.RUNNING, started_at=time.time() - 100)
    ray.status[victim.id] = "RUNNING"
    queue.submit("mnist", CPU_JOB, tenant="team-a", priority="high")
    d.cycle()
    assert ray.stopped == []
    d.cycle(now=time.time())
    with queue.store.engine.begin() as conn:  # the request was made 31 s ago
        from sqlalchemy import update

        from ray_apps.scheduler.store import jobs
        conn.execute(update(jobs).where(jobs.c.id == victim.id).values(updated_at=time.time() - 31))
    d.cycle()
    assert ray.stopped == [victim.id]


def test_a_cycle_probes_mlflow_once_and_the_run_it_creates_is_not_probed_again(make, monkeypatch):
    probes, created = [], []
    monkeypatch.setattr(dispatcher_module, "mlflow_healthy", lambda *a, **kw: probes.append(1) or True)
    monkeypatch.setattr(dispatcher_module, "create_run",
                        lambda *a, **kw: created.append(kw.get("checked")) or (f"run-{len(created)}", None))
    queue, d, _ = make({"poll_s": 0.1}, node(4))
    for _ in range(2):
        queue.submit("mnist", CPU_JOB, tenant="team-a")
    report = d.cycle()
    assert len(report.admitted) == 2 and probes == [1] and created == [True, True]
