""""Why is my job waiting?": one answer for the CLI, REST, the agent and the status page.

The dispatcher writes it (`wait_rows`, after each plan) and everyone else reads it (`why`).

A queued job's answer is what the dispatcher's last plan published (`job_waits`): the
blocking reason in structured form (`kind`, one of policy.WAIT_KINDS), its position
among the queued jobs of its class, and an estimated start with an interval (from
running jobs' forecast ends and the forecast run times of the jobs ahead). A job that
is not queued says what it is doing instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ray_apps.scheduler import policy
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobRecord, StoredForecast, WaitRow

STALE_S = 30.0  # a plan older than this is said to be so: the dispatcher may be down
ESTIMATE_MAX_QUEUE = 2000  # start estimates for queues up to this long (positions for any length)
ROUND_S = 10.0  # estimates are rounded so that an unchanged queue rewrites nothing


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


# --------------------------------------------------------------------------- the dispatcher's side


def wait_rows(plan: policy.Plan, queued: list[policy.QueuedJob], held: list[policy.QueuedJob],
              running: list[policy.RunningJob], forecasts: dict[str, StoredForecast], free: list[policy.Node],
              waiting: dict[str, policy.Wait], now: float) -> dict[str, WaitRow]:
    """Each job still queued after `plan`: its reason, its position in its class in the plan's order
    (jobs `held` out of the plan last) and its estimated start (low, middle, high)."""
    decided = set(plan.admit) | set(plan.reject)
    by_id = {j.id: j for j in queued}
    ordered = [by_id[i] for i in plan.order if i not in decided] + held
    estimates = _estimates(ordered, running, forecasts, free, now) if len(ordered) <= ESTIMATE_MAX_QUEUE else {}
    per_class: dict[str, int] = {}
    for j in ordered:
        per_class[j.priority] = per_class.get(j.priority, 0) + 1
    seen: dict[str, int] = {}
    rows = {}
    for j in ordered:
        seen[j.priority] = seen.get(j.priority, 0) + 1
        wait = waiting.get(j.id) or policy.Wait("capacity", "waiting for free resources")
        low, mid, high = estimates.get(j.id, (None, None, None))
        rows[j.id] = WaitRow(wait.kind, wait.reason, seen[j.priority], per_class[j.priority], low, mid, high)
    return rows


def _run_s(f: StoredForecast | None) -> tuple[float, float, float] | None:
    if f is None or f.run_s_low is None or f.run_s_high is None:
        return None
    return f.run_s_low, (f.run_s_low + f.run_s_high) / 2, f.run_s_high


def _estimates(ordered: list[policy.QueuedJob], running: list[policy.RunningJob],
               forecasts: dict[str, StoredForecast], free: list[policy.Node], now: float) -> dict[str, tuple]:
    """policy.estimate_starts with every forecast at its low, middle and high."""
    out: dict[str, list] = {j.id: [] for j in ordered}
    runs = {j.id: _run_s(forecasts.get(j.id)) for j in [*ordered, *running]}
    for k in range(3):
        ends = [(r.gang, None if runs[r.id] is None else r.started_at + runs[r.id][k]) for r in running]
        jobs = [policy.QueuedJob(j.id, j.tenant, j.priority, j.submitted_at, j.gang,
                                 run_s=None if runs[j.id] is None else runs[j.id][k]) for j in ordered]
        for job_id, at in policy.estimate_starts(jobs, ends, free, now).items():
            out[job_id].append(None if at is None else round(at / ROUND_S) * ROUND_S)
    return {i: tuple(v) for i, v in out.items()}
