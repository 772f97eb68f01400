"""Jobs submitted around the queue: recognised from their entrypoint and recorded as attempt 1."""
from types import SimpleNamespace

import pytest

from ray_apps.scheduler.adoption import ADOPTED_PRIORITY, ADOPTED_TENANT, adopt_unknown, parse_entrypoint
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore


@pytest.mark.parametrize("entrypoint, expected", [
    ("python -m trainers.mnist --epochs 2", ("mnist", {"epochs": 2}, 1, 2.0, 0.0)),
    ("python -m trainers.probe --num-workers 2 --gpus-per-worker 1 --seconds 3 --run-name x",
     ("probe", {"num_workers": 2, "gpus_per_worker": 1.0, "seconds": 3.0}, 2, 1.0, 1.0)),
    ("python -m trainers.tune mnist --num-samples 4 --epochs 1", ("mnist", {"epochs": 1}, 1, 2.0, 0.0)),
])
def test_a_trainer_entrypoint_gives_its_trainer_params_and_gang(entrypoint, expected):
    got = parse_entrypoint(entrypoint)
    assert (got.trainer, got.params, got.workers, got.cpus_per_worker, got.gpus_per_worker) == expected


@pytest.mark.parametrize("entrypoint", ["python train.py", "python -m trainers.nope", "bash -c 'rm -rf /'",
                                        "python -m trainers.mnist --epochs lots", "python -m trainers.tune nope",
                                        "python -m 'unterminated"])
def test_anything_else_is_left_alone(entrypoint):
    assert parse_entrypoint(entrypoint) is None


def ray_job(sid, entrypoint, status, **kw):
    return SimpleNamespace(submission_id=sid, type=SimpleNamespace(value="SUBMISSION"), entrypoint=entrypoint,
                           status=SimpleNamespace(value=status), metadata=kw.get("metadata"),
                           start_time=kw.get("start_ms"), end_time=kw.get("end_ms"))


def test_unknown_trainer_jobs_are_recorded_once_with_their_tenant_and_run_time(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'q.db'}")
    listed = [ray_job("raysubmit_a", "python -m trainers.probe --gpus-per-worker 1", "SUCCEEDED",
                      metadata={"tenant": "team-a", "mlflow_run_id": "r1"}, start_ms=1_000_000, end_ms=1_060_000),
              ray_job("raysubmit_b", "python -m trainers.mnist", "RUNNING", start_ms=2_000_000),
              ray_job("raysubmit_c", "python my_script.py", "RUNNING")]
    assert adopt_unknown(store, listed, known_ids=set()) == ["raysubmit_a", "raysubmit_b"]
    a, b = store.get("raysubmit_a"), store.get("raysubmit_b")
    assert (a.state, a.tenant, a.priority, a.mlflow_run_id, a.gpus_per_worker) == (
        JobState.SUCCEEDED, "team-a", ADOPTED_PRIORITY, "r1", 1.0)
    assert (a.started_at, a.ended_at, a.ray_submission_id, a.attempt) == (1000.0, 1060.0, "raysubmit_a", 1)
    assert (b.state, b.tenant, b.ended_at) == (JobState.RUNNING, ADOPTED_TENANT, None)
    assert [(x.started_at, x.ended_at) for x in store.attempts(["raysubmit_a"])["raysubmit_a"]] == [(1000.0, 1060.0)]
    known = store.known_ids(["raysubmit_a", "raysubmit_b", "raysubmit_c"])
    assert known == {"raysubmit_a", "raysubmit_b"}
    assert adopt_unknown(store, listed, known_ids=known) == []   # once only
