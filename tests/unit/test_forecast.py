"""Forecast math: robust per-unit time, honest intervals, pre-start scaling."""

import random

import pytest

from ray_apps.costs.forecast import (ForecastError, PastRun, Progress, fit_unit_time, forecast_prestart,
                                     forecast_running, profile_run, tail_of, timer_ratio_of, unit_time)

RATE = 3600.0  # $1 per second keeps the arithmetic readable


def points(start, durations, first_extra=0.0):
    at, out = start + first_extra, []
    for i, d in enumerate(durations, 1):
        at += d
        out.append(Progress(units=i, at=at))
    return out


def test_the_slow_first_unit_does_not_count_as_a_typical_one():
    pts = points(0.0, [10, 10, 10, 10], first_extra=30.0)  # 30 s of start-up before unit 1
    ut = unit_time(pts)
    assert ut.mean_s == pytest.approx(10.0) and ut.n == 3


def test_running_forecast_point_subtracts_the_unit_in_progress_and_adds_the_tail():
    pts = points(0.0, [10, 10, 10], first_extra=20.0)      # 3 of 10 units done at t=50
    fc = forecast_running(points=pts, units_total=10, now=54.0, spent_s=54.0, usd_per_hour=RATE,
                          tail=(6.0, 1.0))
    assert fc.progress == pytest.approx(0.3) and fc.units_done == 3
    assert fc.remaining_s == pytest.approx(7 * 10 - 4 + 6)
    assert fc.total_usd == pytest.approx(54 + 72)
    assert fc.total_usd_low < fc.total_usd < fc.total_usd_high and fc.total_usd_low >= fc.spent_usd


def test_the_90_percent_interval_covers_about_90_percent_of_simulated_runs():
    rng = random.Random(7)
    hits, trials = 0, 400
    for _ in range(trials):
        durations = [rng.gauss(10, 1.0) for _ in range(12)]
        tail = rng.gauss(5, 1.0)
        pts = points(0.0, durations, first_extra=20.0)
        half = pts[:6]                                    # forecast at 50% progress
        now = half[-1].at
        fc = forecast_running(points=half, units_total=12, now=now, spent_s=now, usd_per_hour=RATE,
                              tail=(5.0, 1.0))
        actual = pts[-1].at + tail
        hits += fc.total_usd_low <= actual <= fc.total_usd_high
    assert 0.82 <= hits / trials <= 0.99


def test_one_unit_done_uses_its_own_timer_with_a_wide_spread_and_says_so():
    fc = forecast_running(points=[Progress(1, 40.0)], units_total=4, now=40.0, spent_s=40.0,
                          usd_per_hour=RATE, single_unit_s=10.0, tail=(5.0, 1.0))
    assert fc.remaining_s == pytest.approx(35.0)
    assert fc.remaining_s_high - fc.remaining_s > 10 and "own timer" in fc.notes[0]


def test_one_unit_done_with_history_scales_its_timer_by_past_runs_ratio():
    # Past runs: a full unit took 1.2x what the trainer's own timer measured (evaluation, checkpoint).
    history = [past("a", 4, 12.0, 20.0, timer=10.0), past("b", 4, 6.0, 20.0, timer=5.0)]
    ratio = timer_ratio_of(history)
    assert ratio[0] == pytest.approx(1.2)
    fc = forecast_running(points=[Progress(1, 32.0)], units_total=4, now=32.0, spent_s=32.0, usd_per_hour=RATE,
                          single_unit_s=10.0, tail=(5.0, 1.0), timer_ratio=ratio)
    assert fc.remaining_s == pytest.approx(3 * 12 + 5)
    assert "ratio of unit time to timer" in fc.notes[0]
    assert timer_ratio_of([past("c", 4, 6.0, 20.0)]) is None  # no timer logged: no ratio


def test_no_progress_yet_is_an_error_naming_what_to_do():
    with pytest.raises(ForecastError, match="no progress yet"):
        forecast_running(points=[], units_total=4, now=1.0, spent_s=1.0, usd_per_hour=RATE)


def past(run_id, units, per_unit, fixed, work=1000, scaling=(1, 2.0, 0.0, 128), tail=4.0, timer=None):
    return PastRun(run_id=run_id, units=units, work_per_unit=work, unit_s=per_unit, fixed_s=fixed,
                   tail_s=tail, scaling=scaling, timer_s=timer)


def test_prestart_without_history_says_so_and_gives_only_the_rate():
    fc = forecast_prestart(history=[], units_total=4, work_per_unit=1000, scaling=(1, 2.0, 0.0, 128),
                           usd_per_hour=0.1, trainer="mnist")
    assert fc.basis == "none" and fc.total_usd is None and "no finished mnist run" in fc.notes[0]


def test_prestart_scales_past_runs_by_units_and_data_size():
    history = [past("a", 2, 10.0, 20.0), past("b", 4, 11.0, 22.0), past("c", 8, 9.0, 18.0)]
    fc = forecast_prestart(history=history, units_total=6, work_per_unit=2000, scaling=(1, 2.0, 0.0, 128),
                           usd_per_hour=RATE, trainer="mnist")
    # median fixed 20 s + 6 units x 2000 examples x median 0.01 s/example
    assert fc.basis == "history" and fc.remaining_s == pytest.approx(20 + 6 * 2000 * 0.010)
    assert fc.remaining_s_low < fc.remaining_s < fc.remaining_s_high
    other = forecast_prestart(history=history, units_total=6, work_per_unit=2000, scaling=(2, 1.0, 0.0, 128),
                              usd_per_hour=RATE, trainer="mnist")
    assert any("no past run with this scaling" in n for n in other.notes)
    assert other.remaining_s_high - other.remaining_s_low > fc.remaining_s_high - fc.remaining_s_low


def test_per_unit_time_is_a_line_in_the_work_when_past_runs_differ_in_size():
    # Each epoch costs 2 s of evaluation plus 1 ms per training example.
    history = [past("a", 4, 2 + 0.001 * 3000, 20.0, work=3000), past("b", 4, 2 + 0.001 * 6000, 20.0, work=6000)]
    assert fit_unit_time(history)(9000) == pytest.approx(11.0)
    fc = forecast_prestart(history=history, units_total=5, work_per_unit=9000, scaling=(1, 2.0, 0.0, 128),
                           usd_per_hour=RATE, trainer="mnist")
    assert fc.remaining_s == pytest.approx(20 + 5 * 11)
    assert fit_unit_time([past("a", 4, 8.0, 20.0, work=4000)])(2000) == pytest.approx(4.0)  # one size: proportional


def test_profile_of_a_finished_run_and_the_tail_prior():
    pts = points(100.0, [10, 10, 10], first_extra=15.0)     # last point at 145
    unit, fixed, tail = profile_run(points=pts, started_at=100.0, ended_at=150.0, units_total=3,
                                    single_unit_s=None)
    assert (unit, fixed, tail) == (pytest.approx(10.0), pytest.approx(20.0), pytest.approx(5.0))
    assert tail_of([]) == (2.0, 2.0)
    mean, sd = tail_of([past("a", 1, 1, 1, tail=4.0), past("b", 1, 1, 1, tail=6.0)])
    assert mean == 5.0 and sd == pytest.approx(1.414, abs=1e-3)
