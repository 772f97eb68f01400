"""Job states of the queue and the transitions the store allows."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "QUEUED"        # waiting in the queue (also after a preemption)
    STARTING = "STARTING"    # admitted: being submitted to Ray under its submission id
    RUNNING = "RUNNING"      # Ray reports it running
    PREEMPTING = "PREEMPTING"  # asked to stop for a higher-priority job; requeued once stopped
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"  # by its owner
    REJECTED = "REJECTED"    # could never run on this cluster

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING, JobState.PREEMPTING})  # holding resources

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.REJECTED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED,
                                  JobState.SUCCEEDED}),
    # RUNNING -> QUEUED: the job vanished with a restarted Ray head; it resumes from its checkpoint.
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTING,
                                 JobState.QUEUED}),
    JobState.PREEMPTING: frozenset({JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
}
