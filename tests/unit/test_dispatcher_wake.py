"""The dispatcher acts on a submission at once: between cycles it watches the SQLite store's change
counter, so another process's commit (a submit, a cancel) starts the next cycle without waiting out
poll_s; its own cycle's writes do not. After a job ends, jobs left waiting are planned again within a
tenth of a second while Ray frees what it held."""
import contextlib
import threading
import time

from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.dispatcher import FREEING_S, CycleReport, Dispatcher
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore


def add_job(store: JobStore, job_id: str, state: JobState = JobState.QUEUED) -> None:
    store.add(id=job_id, trainer="probe", params={}, tenant="t", priority="normal", workers=1,
              cpus_per_worker=1, gpus_per_worker=0, state=state)


@contextlib.contextmanager
def running(tmp_path, cycle_with):
    """A dispatcher with poll_s 30 s whose cycle is `cycle_with(dispatcher, cycles)` (a CycleReport, or
    None for an empty one), looping in a thread; yields the list of its cycles' start times."""
    dispatcher = Dispatcher(Queue.from_settings(Settings(data_dir=tmp_path), QueueConfig(poll_s=30)))
    cycles: list[float] = []

    def cycle():
        cycles.append(time.monotonic())
        return cycle_with(dispatcher, cycles) or CycleReport()

    dispatcher.cycle = cycle
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield cycles
    finally:
        stop.set()
        thread.join(timeout=10)


def wait_for(cycles: list[float], n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(cycles) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_watch_sees_other_connections_commits_and_forgets_what_it_marked(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")
    watch = store.change_watch()
    assert not watch.changed()
    add_job(store, "a")  # the engine's connection is another connection
    assert watch.changed()
    watch.mark()
    assert not watch.changed()


def test_a_write_between_cycles_starts_the_next_cycle_long_before_poll_s(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there; the cycle is stubbed

    def adopts_a_job(dispatcher, cycles):  # writes to the store, as a real cycle does
        add_job(dispatcher.queue.store, f"written-by-cycle-{len(cycles)}", JobState.RUNNING)

    with running(tmp_path, adopts_a_job) as cycles:
        wait_for(cycles, 1)
        time.sleep(0.5)
        assert len(cycles) == 1  # its own write woke nothing: the next cycle is poll_s (30 s) away
        written = time.monotonic()
        add_job(JobStore(f"sqlite:///{tmp_path / 'queue.db'}"), "submitted-elsewhere")
        wait_for(cycles, 2)
        assert len(cycles) == 2 and cycles[1] - written < 1.0


def test_a_job_submitted_while_a_cycle_runs_gets_the_next_cycle_at_once(tmp_path, monkeypatch):
    """The cycle read the queue before this submit landed: marking the store as seen after the cycle
    must not leave the job waiting out poll_s."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    elsewhere = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")

    def a_submit_lands_mid_cycle(dispatcher, cycles):  # from another process, in the first cycle only
        if len(cycles) == 1:
            add_job(elsewhere, "submitted-mid-cycle")

    with running(tmp_path, a_submit_lands_mid_cycle) as cycles:
        wait_for(cycles, 2)
        assert len(cycles) >= 2 and cycles[1] - cycles[0] < 1.0
        time.sleep(0.5)
        assert len(cycles) == 2  # and no loop: the job is older than the second cycle


def test_after_a_job_ends_a_waiting_job_is_planned_again_within_a_tenth_of_a_second_for_a_while(
        tmp_path, monkeypatch):
    """Ray frees an ended job's placement group a moment after the job ends: the job waiting for it is
    planned again every 0.1 s for FREEING_S, then every poll_s; with nothing waiting, poll_s at once."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")

    def one_job_ends_and_another_waits(dispatcher, cycles):
        dispatcher.waiting = {"queued-job": "waits for CPUs"}
        return CycleReport(finished=["ended-job"]) if len(cycles) == 1 else None

    with running(tmp_path, one_job_ends_and_another_waits) as cycles:
        time.sleep(FREEING_S + 1.0)
        gaps = [b - a for a, b in zip(cycles, cycles[1:])]
        assert 15 <= len(cycles) <= 40 and max(gaps[:10]) < 0.5  # ~every 0.1 s, for ~3 s
        settled = len(cycles)
        time.sleep(1.0)
        assert len(cycles) == settled  # then poll_s (30 s)

    def one_job_ends_and_none_waits(dispatcher, cycles):
        dispatcher.waiting = {}
        return CycleReport(finished=["ended-job"]) if len(cycles) == 1 else None

    with running(tmp_path / "idle", one_job_ends_and_none_waits) as cycles:
        time.sleep(1.0)
        assert len(cycles) == 1


def test_after_a_cycle_that_wrote_nothing_the_queued_jobs_are_not_read_again(tmp_path, monkeypatch):
    """`_submitted_since` (a read of the QUEUED jobs) runs only when the store changed during the cycle."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    reads: list[float] = []

    def idle_then_written(dispatcher, cycles):
        if len(cycles) == 1:
            original = dispatcher._submitted_since
            dispatcher._submitted_since = lambda since: reads.append(since) or original(since)
        if len(cycles) == 2:
            add_job(dispatcher.queue.store, "written-by-cycle-2", JobState.RUNNING)

    with running(tmp_path, idle_then_written) as cycles:
        wait_for(cycles, 1)
        time.sleep(0.3)
        assert reads == []  # the first cycle wrote nothing
        add_job(JobStore(f"sqlite:///{tmp_path / 'queue.db'}"), "submitted-elsewhere")  # wakes cycle 2
        wait_for(cycles, 2)
        time.sleep(0.3)
        assert len(reads) == 1  # cycle 2 wrote: the queue is read once to look for a submit it missed
