"""The dispatcher acts on a submission at once: between cycles it watches the SQLite store's change
counter, so another process's commit (a submit, a cancel) starts the next cycle without waiting out
poll_s; its own cycle's writes do not."""
import threading
import time
from types import SimpleNamespace

from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.dispatcher import Dispatcher
from ray_apps.scheduler.states import JobState
from ray_apps.scheduler.store import JobStore


def add_job(store: JobStore, job_id: str, state: JobState = JobState.QUEUED) -> None:
    store.add(id=job_id, trainer="probe", params={}, tenant="t", priority="normal", workers=1,
              cpus_per_worker=1, gpus_per_worker=0, state=state)


def test_the_watch_sees_other_connections_commits_and_forgets_what_it_marked(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.db'}")
    watch = store.change_watch()
    assert not watch.changed()
    add_job(store, "a")  # the engine's connection is another connection
    assert watch.changed()
    watch.mark()
    assert not watch.changed()


def test_a_write_between_cycles_starts_the_next_cycle_long_before_poll_s(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there; the cycle below is stubbed
    dispatcher = Dispatcher(Queue.from_settings(Settings(data_dir=tmp_path), QueueConfig(poll_s=30)))
    cycles = []

    def cycle():  # writes to the store, as a real cycle does (here: a job adopted from Ray)
        cycles.append(time.monotonic())
        add_job(dispatcher.queue.store, f"written-by-cycle-{len(cycles)}", JobState.RUNNING)
        return SimpleNamespace()

    dispatcher.cycle = cycle
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not cycles and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert len(cycles) == 1  # its own write woke nothing: the next cycle is poll_s (30 s) away
        written = time.monotonic()
        add_job(JobStore(f"sqlite:///{tmp_path / 'queue.db'}"), "submitted-elsewhere")
        while len(cycles) < 2 and time.monotonic() < written + 10:
            time.sleep(0.01)
        assert len(cycles) == 2 and cycles[1] - written < 1.0
    finally:
        stop.set()
        thread.join(timeout=10)


def test_a_job_submitted_while_a_cycle_runs_gets_the_next_cycle_at_once(tmp_path, monkeypatch):
    """The cycle read the queue before this submit landed: marking the store as seen after the cycle
    must not leave the job waiting out poll_s."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    dispatcher = Dispatcher(Queue.from_settings(Settings(data_dir=tmp_path), QueueConfig(poll_s=30)))
    elsewhere, cycles = JobStore(f"sqlite:///{tmp_path / 'queue.db'}"), []

    def cycle():
        cycles.append(time.monotonic())
        if len(cycles) == 1:  # a submit from another process lands mid-cycle
            add_job(elsewhere, "submitted-mid-cycle")
        return SimpleNamespace()

    dispatcher.cycle = cycle
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(cycles) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(cycles) >= 2 and cycles[1] - cycles[0] < 1.0
        time.sleep(0.5)
        assert len(cycles) == 2  # and no loop: the job is older than the second cycle
    finally:
        stop.set()
        thread.join(timeout=10)
