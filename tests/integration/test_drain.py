"""A drain request through Ray's GCS key-value store, on a real local Ray head and MLflow server.

The platform's side (`trainers.drain.request_drain`, `checkpoint_records`, `drain_acknowledged`,
`clear`) talks to the GCS by address, as the dispatcher does; the trainer reads the request
inside its Ray Train worker, checkpoints at the next step boundary and exits with DRAINED_EXIT;
the next attempt (`--resume`, a new submission id) continues at that exact step.
"""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from ray_apps import processes
from ray_apps.training import follow, submit_entrypoint, submit_training
from tests.integration.conftest import job_logs
from trainers import drain

pytestmark = pytest.mark.slow
# 8,000 images at batch 128: 63 steps an epoch, several seconds on this machine's CPUs, so a drain asked
# right after the 1st epoch's checkpoint lands inside the 2nd epoch.
SIZE = {"train_samples": 8000, "test_samples": 500}
GRACE_S = 30


def test_a_drained_job_checkpoints_at_a_step_exits_75_and_its_next_attempt_resumes_there(platform):
    gcs = platform.gcs_address
    sub = submit_training(platform, "mnist", {"epochs": 3, **SIZE}, metadata={"tenant": "team-a"})
    sid = sub.submission_id
    try:
        # The 1st epoch's checkpoint, as the platform sees it: its KV record says "resume at epoch 1 step 0".
        assert processes.wait_until(lambda: sid in drain.checkpoint_records(gcs, [sid]), timeout=240, interval=0.2), \
            job_logs(platform, sid)[-3000:]
        first = drain.checkpoint_records(gcs, [sid])[sid]
        assert (first.epoch, first.step, first.drained) == (1, 0, False)
        assert drain.last_checkpoints(gcs, [sid, "no-such-job"]) == {sid: first.at}
        assert drain.drain_acknowledged(gcs, sid) is None

        asked_at = time.time()
        drain.request_drain(gcs, sid, asked_at)
        # Read the answer while the job exits: once Ray reports it ended, the platform's dispatcher (which
        # adopts this job, submitted around the queue) clears its keys, as it does for every ended attempt.
        answered = []
        assert processes.wait_until(lambda: answered.append(drain.drain_acknowledged(gcs, sid)) or answered[-1],
                                    timeout=GRACE_S, interval=0.1), job_logs(platform, sid)[-3000:]
        record = answered[-1]
        assert record.drained and record.drain_requested_at == asked_at
        assert record.epoch == 1 and record.step > 0 and record.at > first.at  # inside the 2nd epoch
        outcome = follow(platform, sid, on_progress=lambda _: None, poll_s=0.5, timeout_s=GRACE_S)
        assert outcome.status == "FAILED", (outcome.status, "\n".join(outcome.log_tail))
        ended_in = time.time() - asked_at
        assert ended_in < GRACE_S

        info = JobSubmissionClient(platform.dashboard_url).get_job_info(sid)
        assert info.driver_exit_code == drain.DRAINED_EXIT
        print(f"drained at epoch 2 step {record.step}/63: checkpoint {record.at - asked_at:.1f} s and job end "
              f"{ended_in:.1f} s after the request")
        logs = job_logs(platform, sid)
        assert f"[oppen] drained at epoch 2 step {record.step}: resumes from this checkpoint" in logs
        assert "epoch 1/3 train_loss" in logs and "epoch 2/3 train_loss" not in logs and "OPPEN_RESULT" not in logs

        client = MlflowClient(platform.tracking_uri)
        run = client.get_run(sub.mlflow_run_id)
        assert run.info.status == "RUNNING"  # left open for the attempt that resumes it; no model logged
        assert not client.search_model_versions(f"run_id = '{sub.mlflow_run_id}'")
        assert [m.step for m in client.get_metric_history(sub.mlflow_run_id, "epoch")] == [1]

        drain.clear(gcs, sid)  # what the dispatcher does when an attempt is over (it may have already)
        assert drain.checkpoint_records(gcs, [sid]) == {} and drain.drain_acknowledged(gcs, sid) is None
    finally:
        drain.clear(gcs, sid)

    # The next attempt: the same command with --resume under a new submission id, as the queue requeues it.
    again = f"{sid}-r2"
    try:
        submit_entrypoint(platform, again, f"{sub.entrypoint} --resume",
                          {"trainer": "mnist", "mlflow_run_id": sub.mlflow_run_id, "tenant": "team-a"})
        resumed = follow(platform, again, on_progress=lambda _: None, poll_s=0.5)
        assert resumed.ok, "\n".join(resumed.log_tail)
        logs = job_logs(platform, again)
        assert f"start_epoch=1 start_step={record.step}" in logs
        assert "epoch 1/3 train_loss" not in logs
        assert "epoch 2/3 train_loss" in logs and "epoch 3/3 train_loss" in logs
        assert resumed.result["epochs"] == 3 and resumed.result["mlflow_run_id"] == sub.mlflow_run_id
        assert resumed.result["model_version"] and resumed.result["test_accuracy"] > 0.8
    finally:
        drain.clear(gcs, again)

    run = client.get_run(sub.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == 3
    assert sorted(m.step for m in client.get_metric_history(sub.mlflow_run_id, "epoch")) == [1, 2, 3]
    assert run.data.tags["oppen.resumed_from_epoch"] == "1"
    assert run.data.tags["oppen.resumed_from_step"] == str(record.step)
