"""`follow_queued`: what a user following a queued job is told (the queue's record and Ray's job,
which end a dispatcher cycle apart)."""

from __future__ import annotations

from types import SimpleNamespace

from ray_apps import training
from ray_apps.scheduler.states import JobState


class Records:
    """The queue's record of one job, as successive reads see it (a thin stand-in for Queue.get)."""

    def __init__(self, *states):
        self.states, self.settings = list(states), None

    def get(self, job_id):
        state, attempt = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return SimpleNamespace(id=job_id, state=state, message="", ray_submission_id=attempt)


def test_the_record_catching_up_after_ray_ended_the_attempt_is_not_announced(monkeypatch):
    followed = []
    monkeypatch.setattr(training, "follow", lambda settings, attempt, **kw: followed.append(attempt) or
                        training.JobOutcome(status="SUCCEEDED", result={"test_accuracy": 0.99}))
    said = []
    queue = Records((JobState.QUEUED, None), (JobState.RUNNING, "j-1"), (JobState.RUNNING, "j-1"),
                    (JobState.SUCCEEDED, "j-1"))
    outcome = training.follow_queued(queue, "j", on_progress=said.append, poll_s=0)
    assert followed == ["j-1"] and outcome.status == "SUCCEEDED" and outcome.result == {"test_accuracy": 0.99}
    assert said == ["job j: QUEUED"]  # no "RUNNING" once Ray has reported the attempt's end
