"""The dispatcher's supervisor as `oppen up` starts it: a light process that restarts its child
when it dies and stops it on SIGTERM."""
import signal
import subprocess
import sys

import psutil

from ray_apps.processes import wait_until
from ray_apps.scheduler.supervisor import dispatcher_command, supervised


def test_the_dispatcher_runs_under_the_supervisor_module_with_the_settings_file():
    cmd = supervised(dispatcher_command("/etc/oppen.yaml"))
    assert cmd[1:4] == ["-m", "ray_apps.scheduler.supervisor", "--"]
    assert cmd[4:] == [sys.executable, "-m", "ray_apps.cli", "--config", "/etc/oppen.yaml", "dispatcher"]


def test_a_killed_child_is_restarted_and_sigterm_stops_both():
    proc = subprocess.Popen(supervised([sys.executable, "-c", "import time; time.sleep(120)"]))
    try:
        sup = psutil.Process(proc.pid)
        assert wait_until(lambda: len(sup.children()) == 1, timeout=20)
        first = sup.children()[0]
        # Nothing but the standard library: a CLI's imports would be ~50 MB here.
        assert sup.memory_info().rss < 30 * 2**20, sup.memory_info()
        first.kill()
        assert wait_until(lambda: [c.pid for c in sup.children()] not in ([], [first.pid]), timeout=20)
        second = sup.children()[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert wait_until(lambda: not second.is_running() or second.status() == psutil.STATUS_ZOMBIE, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
