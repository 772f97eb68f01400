""""Why is my job waiting?": one answer for the CLI, REST, the agent and the status page.

A queued job's answer is what the dispatcher's last plan published (`job_waits`): the
blocking reason in structured form (`kind`, one of policy.WAIT_KINDS), its position
among the queued jobs of its class, and an estimated start with an interval (from
running jobs' forecast ends and the forecast run times of the jobs ahead). A job that
is not queued says what it is doing instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobRecord

STALE_S = 30.0  # a plan older than this is said to be so: the dispatcher may be down


@dataclass(frozen=True)
class Why:
    id: str
    state: str
    priority: str
    tenant: str
    kind: str                   # a policy.WAIT_KINDS value while queued; the state's name otherwise
    reason: str
    position: int | None = None  # 1-based among queued jobs of its class
    of: int | None = None
    start_in_s: tuple[float | None, float | None, float | None] | None = None  # low, middle, high from now
    as_of: float | None = None   # when the dispatcher decided it

    def as_dict(self) -> dict:
        d = asdict(self)
        d["start_in_s"] = None if self.start_in_s is None else dict(zip(("low", "mid", "high"), self.start_in_s))
        return d

    def text(self) -> str:
        if self.state != JobState.QUEUED.value:
            return f"{self.id} is {self.state}: {self.reason}"
        lines = [f"{self.id} waits ({self.kind}): {self.reason}"]
        if self.position:
            lines.append(f"  position {self.position} of {self.of} queued {self.priority} jobs")
        lines.append(f"  estimated start: {start_text(self.start_in_s)}")
        return "\n".join(lines)


def start_text(start_in_s) -> str:
    if not start_in_s or start_in_s[1] is None:
        return "not known (a job it waits on has no forecast yet)"
    low, mid, high = start_in_s
    if high is None:
        return f"in about {_dur(mid)} (at least {_dur(low)}; no upper bound known)"
    if high <= 0:
        return "now (at the next dispatcher cycle)"
    return f"in about {_dur(mid)} ({_dur(low)} to {_dur(high)})"


def _dur(seconds: float | None) -> str:
    s = max(0.0, seconds or 0.0)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def why(queue, job_id: str, *, tenant: str | None = None, now: float | None = None) -> Why:
    """The answer for one job (UnknownJob if it is not the caller's)."""
    now = time.time() if now is None else now
    job = queue.get(job_id, tenant=tenant)
    if job.state is not JobState.QUEUED:
        return Why(job.id, job.state.value, job.priority, job.tenant, job.state.value.lower(), _not_queued(job, now))
    row = queue.store.wait_of(job.id)
    if row is None:
        return Why(job.id, job.state.value, job.priority, job.tenant, "new",
                   f"not planned yet: the dispatcher looks at new jobs every {queue.config.poll_s:g} s")
    reason = row.reason
    if now - row.at > STALE_S and now - job.updated_at > STALE_S:
        reason += f" (as of {now - row.at:.0f} s ago: is the dispatcher running? `oppen status` says)"
    starts = tuple(None if t is None else max(0.0, t - now) for t in (row.start_low, row.start_mid, row.start_high))
    return Why(job.id, job.state.value, job.priority, job.tenant, row.kind, reason, row.position, row.of,
               starts, row.at)


def _not_queued(job: JobRecord, now: float) -> str:
    if job.state is JobState.RUNNING:
        return f"running for {_dur(now - (job.started_at or now))}"
    if job.state is JobState.STARTING:
        return "admitted: Ray is starting it"
    if job.state is JobState.PREEMPTING:
        return f"being preempted: {job.message}"
    return job.message or "finished"
