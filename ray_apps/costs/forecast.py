"""Forecasts of a job's remaining time and cost, as a point and a 90% interval.

Pure functions over measured data; `service` feeds them from the store and MLflow.

Running job: a trainer logs a progress point per unit of work (an epoch for
MNIST) with the time it was logged. The time per unit comes from the gaps
between points of the current attempt, so the first unit, which also pays for
worker start-up and data loading, never counts as a typical one. Remaining =
units left x time per unit - time already spent on the unit in progress + the
tail after the last unit (model upload, shutdown) learned from past runs. The
interval adds per-unit noise (r units, variance r*s^2), the uncertainty of the
mean itself (r^2 * s^2/n, with Student's t for small n) and the tail's spread.

Before a job starts: past runs of the same trainer give a fixed part (start-up
and tail) and a time per example per unit, scaled to the new run's units and
data size. With no past run there is no figure, only the hourly rate, said so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from trainers.errors import Conflict

# Two-sided 90% Student t quantiles by degrees of freedom (n - 1).
_T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
        10: 1.812, 15: 1.753, 20: 1.725, 30: 1.697}
Z90 = 1.645
MIN_REL_SD = 0.03        # this 2-core box: identical epochs differ by a few %
ONE_POINT_REL_SD = 0.25  # one unit seen: its pure train time, without a measured spread
# Seconds after the last unit (mean, sd) when no past run says better: a job's finishing phase
# (model upload, registration, shutdown) measures 0.8-1.5 s here (benchmarks/startup.py).
DEFAULT_TAIL = (2.0, 2.0)


class ForecastError(Conflict):
    """A forecast that cannot be made (finished job, no progress data...), with the reason."""


def t90(dof: int) -> float:
    if dof <= 0:
        return _T90[1]
    keys = [k for k in _T90 if k <= dof]
    return _T90[max(keys)] if dof <= 30 else Z90


@dataclass(frozen=True)
class Progress:
    """A progress point: `units` done (cumulative, e.g. epochs) at wall time `at` (seconds)."""

    units: float
    at: float


@dataclass(frozen=True)
class UnitTime:
    mean_s: float
    sd_s: float
    n: int          # gaps measured; 0 means taken from a single unit's own timer


@dataclass(frozen=True)
class Forecast:
    basis: str                       # "progress", "history" or "none"
    remaining_s: float | None
    remaining_s_low: float | None
    remaining_s_high: float | None
    spent_usd: float
    total_usd: float | None
    total_usd_low: float | None
    total_usd_high: float | None
    usd_per_hour: float
    progress: float | None = None    # fraction of units done
    units_done: float | None = None
    units_total: float | None = None
    notes: list[str] = field(default_factory=list)
    confidence: float = 0.90

    def as_dict(self) -> dict:
        return dict(vars(self))


def unit_time(points: list[Progress], single_unit_s: float | None = None, *,
              timer_ratio: tuple[float, float] | None = None) -> UnitTime | None:
    """Seconds per unit from the gaps between consecutive points (in unit-weighted form).

    With a single point: that unit's own timer (its training time, without the
    evaluation and checkpoint around it) scaled by the ratio of full unit time to
    timer that past runs measured; without past runs, the bare timer, spread ±25%.
    Not the time since the job started: start-up varies by tens of seconds."""
    pts = sorted(points, key=lambda p: p.units)
    gaps = [(b.at - a.at) / (b.units - a.units) for a, b in zip(pts, pts[1:]) if b.units > a.units]
    if gaps:
        mean = statistics.fmean(gaps)
        sd = statistics.stdev(gaps) if len(gaps) > 1 else mean * ONE_POINT_REL_SD / 2
        return UnitTime(mean, max(sd, mean * MIN_REL_SD), len(gaps))
    if single_unit_s and single_unit_s > 0:
        if timer_ratio:
            mean = single_unit_s * timer_ratio[0]
            return UnitTime(mean, math.hypot(single_unit_s * timer_ratio[1], mean * MIN_REL_SD * 2), 0)
        return UnitTime(single_unit_s, single_unit_s * ONE_POINT_REL_SD, 0)
    return None


def forecast_running(*, points: list[Progress], units_total: float, now: float, spent_s: float,
                     usd_per_hour: float, single_unit_s: float | None = None,
                     tail: tuple[float, float] = DEFAULT_TAIL, timer_ratio: tuple[float, float] | None = None,
                     notes: list[str] | None = None) -> Forecast:
    """Remaining time and final cost of a running job from its own progress points."""
    notes = list(notes or [])
    spent_usd = spent_s * usd_per_hour / 3600
    if not points:
        raise ForecastError("the job has reported no progress yet (it is starting up); ask again after "
                            "its first unit of work, or ask for a forecast by trainer and parameters")
    ut = unit_time(points, single_unit_s, timer_ratio=timer_ratio)
    if ut is None:
        raise ForecastError("one progress point and no per-unit timer: no basis for a forecast yet")
    if ut.n == 0:
        notes.append("one unit done: its own timer scaled by past runs' ratio of unit time to timer"
                     if timer_ratio else "one unit done: per-unit time is that unit's own timer, spread assumed ±25%")
    last = max(points, key=lambda p: p.units)
    left = max(units_total - last.units, 0.0)
    in_unit = max(now - last.at, 0.0) if left else 0.0
    tail_mean, tail_sd = tail
    point = max(left * ut.mean_s - in_unit, 0.0) + (tail_mean if left else max(tail_mean - (now - last.at), 0.0))
    k = t90(ut.n - 1) if ut.n >= 2 else Z90
    var = left * ut.sd_s ** 2 + (left * ut.sd_s) ** 2 / max(ut.n, 1) + tail_sd ** 2
    half = k * math.sqrt(var)
    low, high = max(point - half, 0.0), point + half
    rate = usd_per_hour / 3600
    return Forecast(basis="progress", remaining_s=point, remaining_s_low=low, remaining_s_high=high,
                    spent_usd=spent_usd, total_usd=spent_usd + point * rate,
                    total_usd_low=spent_usd + low * rate, total_usd_high=spent_usd + high * rate,
                    usd_per_hour=usd_per_hour, progress=min(last.units / units_total, 1.0) if units_total else None,
                    units_done=last.units, units_total=units_total, notes=notes)


@dataclass(frozen=True)
class PastRun:
    """What a finished run of a trainer measured (the meter logs these to its MLflow run)."""

    run_id: str
    units: float
    work_per_unit: float        # examples per unit (MNIST: training images per epoch)
    unit_s: float               # seconds per unit after the first
    fixed_s: float              # run time not explained by units x unit_s (start-up, tail)
    tail_s: float | None
    scaling: tuple              # (workers, cpus/worker, gpus/worker, batch size): comparable runs
    timer_s: float | None = None  # the trainer's own per-unit timer (last unit), e.g. epoch_time_s


def _prior(values: list[float], default: tuple[float, float] | None) -> tuple[float, float] | None:
    if not values:
        return default
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else max(mean * 0.5, 1.0)
    return mean, max(sd, 0.5)


def tail_of(history: list[PastRun]) -> tuple[float, float]:
    """Seconds from the last unit to the job's end (mean, sd) in past runs."""
    return _prior([r.tail_s for r in history if r.tail_s is not None and r.tail_s >= 0], DEFAULT_TAIL)


def timer_ratio_of(history: list[PastRun]) -> tuple[float, float] | None:
    """Full time per unit / the trainer's own unit timer (mean, sd) in past runs; None without any."""
    ratios = [r.unit_s / r.timer_s for r in history if r.timer_s and r.timer_s > 0 and r.unit_s > 0]
    if not ratios:
        return None
    mean = statistics.fmean(ratios)
    return mean, max(statistics.stdev(ratios) if len(ratios) > 1 else mean * 0.1, mean * 0.02)


def forecast_prestart(*, history: list[PastRun], units_total: float, work_per_unit: float, scaling: tuple,
                      usd_per_hour: float, trainer: str) -> Forecast:
    """Time and cost of a run not started yet, scaled from past runs of the same trainer."""
    if not history:
        return Forecast(basis="none", remaining_s=None, remaining_s_low=None, remaining_s_high=None,
                        spent_usd=0.0, total_usd=None, total_usd_low=None, total_usd_high=None,
                        usd_per_hour=usd_per_hour, units_total=units_total,
                        notes=[f"no finished {trainer} run has been metered yet, so there is no history to "
                               f"forecast from; this allocation costs ${usd_per_hour:.4f} per hour of running"])
    notes = []
    same = [r for r in history if r.scaling == scaling]
    if same:
        used = same
    else:
        used = history
        notes.append("no past run with this scaling (workers, CPUs, GPUs, batch size): scaled from other "
                     "scalings, so the interval is wider")
    unit_fit = fit_unit_time(used)
    fixed = [r.fixed_s for r in used]
    # Each past run's own ratio to the fitted line says how far a new run may stray from it.
    ratios = [r.unit_s / unit_fit(r.work_per_unit) for r in used]
    unit = unit_fit(work_per_unit)
    predictions = [f + units_total * unit * q for f in fixed for q in ratios]
    point = statistics.median(fixed) + units_total * unit
    # With few runs the observed range understates the spread: widen it.
    widen = 0.25 if len(used) < 3 else 0.10
    if not same:
        widen += 0.25
    low = max(min(predictions) * (1 - widen), 0.0)
    high = max(predictions) * (1 + widen)
    notes.append(f"from {len(used)} past run(s) of {trainer}")
    rate = usd_per_hour / 3600
    return Forecast(basis="history", remaining_s=point, remaining_s_low=low, remaining_s_high=high,
                    spent_usd=0.0, total_usd=point * rate, total_usd_low=low * rate, total_usd_high=high * rate,
                    usd_per_hour=usd_per_hour, progress=0.0, units_done=0.0, units_total=units_total, notes=notes)


def fit_unit_time(runs: list[PastRun]):
    """Seconds per unit as a function of work per unit: a + b * work (least squares) when past
    runs differ in work, else proportional to work. A unit has a cost that does not scale
    with its data (evaluation, checkpoint, reporting), which the intercept captures."""
    xs = [r.work_per_unit for r in runs]
    ys = [r.unit_s for r in runs]
    if len(set(xs)) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        if a >= 0 and b > 0:
            return lambda work: a + b * work
    per_work = statistics.median(y / x for x, y in zip(xs, ys))
    return lambda work: per_work * work


def profile_run(*, points: list[Progress], started_at: float, ended_at: float, units_total: float,
                single_unit_s: float | None) -> tuple[float | None, float | None, float | None]:
    """(unit_s, fixed_s, tail_s) of a finished single-attempt run, for later forecasts."""
    if not points:
        return None, None, None
    ut = unit_time(points, single_unit_s)
    tail = max(ended_at - max(p.at for p in points), 0.0)
    if ut is None:
        return None, None, tail
    return ut.mean_s, (ended_at - started_at) - units_total * ut.mean_s, tail
