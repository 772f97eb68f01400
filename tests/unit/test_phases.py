"""Where a job's time went: the trainer's clock, the phases from the queue's times and the run's tags,
and their round trip through a real SQLite store to the status page's data."""
import time

import pytest

from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore
from trainers.phases import TAG_FIRST_STEP, TAG_LOOP, TAG_TRAINED, PhaseClock, Phases, phases_of


def tags(loop, first, trained):
    return {TAG_LOOP: str(loop), TAG_FIRST_STEP: str(first), TAG_TRAINED: str(trained)}


def test_the_last_attempt_s_phases_add_up_to_submit_to_end():
    p = phases_of(1000.0, [(1004.0, 1060.0)], tags(1020.0, 1021.5, 1052.0))
    assert p == Phases(queued=4.0, starting=16.0, first_step=1.5, training=30.5, finishing=8.0)
    assert sum(vars(p).values()) == pytest.approx(60.0)
    assert p.overhead == pytest.approx(25.5)
    assert p.as_metrics() == {"phase_queued_s": 4.0, "phase_starting_s": 16.0, "phase_first_step_s": 1.5,
                              "phase_training_s": 30.5, "phase_finishing_s": 8.0}


def test_a_resumed_job_queues_from_its_previous_attempt_s_end():
    p = phases_of(0.0, [(10.0, 50.0), (80.0, 120.0)], tags(90.0, 91.0, 115.0))
    assert (p.queued, p.starting, p.finishing) == (30.0, 10.0, 5.0)


def test_tags_of_an_earlier_attempt_or_none_give_only_the_queue_s_part():
    earlier = tags(20.0, 21.0, 45.0)  # the second attempt failed before its first report
    assert phases_of(0.0, [(10.0, 50.0), (80.0, 85.0)], earlier) == Phases(30.0, None, None, None, None)
    assert phases_of(0.0, [(3.0, 9.0)], {}) == Phases(3.0, None, None, None, None)
    assert phases_of(0.0, [(3.0, None)], tags(4, 5, 6)).starting is None  # still running
    assert phases_of(0.0, [], {}) is None
    assert Phases(1.0, None, None, None, None).as_metrics() == {"phase_queued_s": 1.0}


def test_a_worker_clock_a_little_behind_the_head_s_still_counts():
    p = phases_of(0.0, [(10.0, 40.0)], tags(9.5, 11.0, 39.0))
    assert p.starting == 0.0 and p.first_step == 1.5


def test_the_clock_keeps_its_first_step_and_reports_now_as_trained():
    clock = PhaseClock()
    clock.stepped()
    first = clock.first_step_at
    time.sleep(0.01)
    clock.stepped()
    t = clock.tags()
    assert float(t[TAG_FIRST_STEP]) == pytest.approx(first, abs=1e-3)
    assert float(t[TAG_LOOP]) <= float(t[TAG_FIRST_STEP]) < float(t[TAG_TRAINED])


def test_phases_round_trip_through_the_store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'q.db'}")
    store.add(id="j", trainer="mnist", params={}, tenant="t", priority="normal", workers=1, cpus_per_worker=1,
              gpus_per_worker=0, state=JobState.QUEUED, message="", now=0.0)
    store.save_phases("j", Phases(1.0, 2.0, 0.5, 30.0, None))
    store.save_phases("j", Phases(9.0, 9.0, 9.0, 9.0, 9.0))  # the first one stands
    assert store.phases(["j", "other"]) == {"j": Phases(1.0, 2.0, 0.5, 30.0, None)}
    assert store.phases([]) == {}
