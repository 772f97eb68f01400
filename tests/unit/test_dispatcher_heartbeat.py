"""The dispatcher's heartbeat: rewritten after every cycle, a failed one too, so that only a hung
or dead loop goes stale (the Kubernetes liveness probe reads its age)."""
import json
import threading
import time

from ray_apps.config import Settings
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.dispatcher import Dispatcher


def test_each_cycle_rewrites_the_heartbeat_and_says_whether_it_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there; an empty queue never asks
    settings = Settings(data_dir=tmp_path)
    dispatcher = Dispatcher(Queue.from_settings(settings, QueueConfig(poll_s=0.05)))
    real_cycle, calls = dispatcher.cycle, []

    def every_other_cycle_fails():
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ConnectionError("Ray went away")
        return real_cycle()

    dispatcher.cycle = every_other_cycle_fails
    assert not dispatcher.heartbeat_path.exists()
    stop, beats = threading.Event(), []
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    started = time.time()
    thread.start()
    try:
        deadline = time.time() + 60
        while len({b["time"] for b in beats}) < 4 and time.time() < deadline:
            if dispatcher.heartbeat_path.exists():
                beats.append(json.loads(dispatcher.heartbeat_path.read_text()))
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert {b["last_cycle_ok"] for b in beats} == {True, False}  # a failed cycle beats too, and says so
    times = [b["time"] for b in beats]
    assert times == sorted(times) and started <= times[0] and len(set(times)) >= 4
    assert dispatcher.heartbeat_path.parent == settings.state_dir
