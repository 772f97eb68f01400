"""Where a job's time goes: the phases of its last attempt, from submit to Ray's end.

    queued      submit (or the previous attempt's end) -> Ray starts the attempt
    starting    Ray's start -> the training loop begins (driver imports, Ray Train's controller
                and workers, data and model set up on the workers)
    first_step  loop begins -> the first optimizer step is done
    training    first step done -> the last epoch's (or window's) report, evaluations included
    finishing   last report -> Ray's end (model logging and registration, shutdown)

Rank 0 of a trainer keeps a `PhaseClock` and sends its times as MLflow tags of the run with each
report; when the job has ended, the dispatcher's cost settlement reads them back with the queue's
own times (`phases_of`) and logs the durations as the run's `phase_*_s` metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CLOCK_SLACK_S = 2.0
PHASES = ("queued", "starting", "first_step", "training", "finishing")
TAG_LOOP, TAG_FIRST_STEP, TAG_TRAINED = "oppen.phase.loop_at", "oppen.phase.first_step_at", "oppen.phase.trained_at"


class PhaseClock:
    """Rank 0's times of this attempt (wall clock, seconds since the epoch)."""

    def __init__(self) -> None:
        self.loop_at = time.time()
        self.first_step_at: float | None = None

    def stepped(self) -> None:
        """After an optimizer step: the first one's time is kept (cheap enough to call every step)."""
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def tags(self) -> dict[str, str]:
        """The run's tags now: its last report is the end of training so far."""
        self.stepped()
        return {TAG_LOOP: f"{self.loop_at:.3f}", TAG_FIRST_STEP: f"{self.first_step_at:.3f}",
                TAG_TRAINED: f"{time.time():.3f}"}


@dataclass(frozen=True)
class Phases:
    queued: float
    starting: float | None
    first_step: float | None
    training: float | None
    finishing: float | None

    def as_metrics(self) -> dict[str, float]:
        return {f"phase_{name}_s": round(value, 3) for name, value in vars(self).items() if value is not None}

    @property
    def overhead(self) -> float | None:
        """Seconds of the attempt not spent training: starting, first step and finishing."""
        parts = (self.starting, self.first_step, self.finishing)
        return None if None in parts else sum(parts)


def phases_of(submitted_at: float, attempts: list[tuple[float, float | None]], tags: dict[str, str]
              ) -> Phases | None:
    """The last attempt's phases. `attempts`: (Ray's start, Ray's end) of each attempt, in order;
    `tags`: the run's tags (a trainer without a clock, or one that never reported, gives only what
    the queue knows). None when no attempt started."""
    if not attempts:
        return None
    started, ended = attempts[-1]
    since = (attempts[-2][1] or started) if len(attempts) > 1 else submitted_at
    queued = max(0.0, started - since)
    marks = []
    for key in (TAG_LOOP, TAG_FIRST_STEP, TAG_TRAINED):
        try:
            marks.append(float(tags[key]))
        except (KeyError, ValueError):
            marks.append(None)
    loop, first, trained = marks
    # Tags of an earlier attempt (this one never reported) are not this attempt's; a worker node's
    # clock may differ from the head's by a little.
    if (loop is None or first is None or trained is None or ended is None
            or loop < started - CLOCK_SLACK_S or trained > ended + CLOCK_SLACK_S):
        return Phases(queued, None, None, None, None)
    return Phases(queued, max(0.0, loop - started), max(0.0, first - loop), max(0.0, trained - first),
                  max(0.0, ended - trained))
