"""Keeps the dispatcher alive: runs it as a child process and restarts it when it dies.

`oppen up` starts this supervisor as a managed service; `kill -9` of the dispatcher
costs at most a restart delay, and the stateless dispatcher picks up from the store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

RESTART_DELAY_S = 1.0
MAX_DELAY_S = 30.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long resets the back-off


def supervise(cmd: list[str]) -> int:
    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    delay = RESTART_DELAY_S
    while True:
        started = time.monotonic()
        child = subprocess.Popen(cmd)
        code = child.wait()
        if stopping:
            return 0
        # Crash-looping (e.g. a bad config) must not burn a core: back off exponentially.
        delay = RESTART_DELAY_S if time.monotonic() - started > HEALTHY_AFTER_S else min(delay * 2, MAX_DELAY_S)
        print(f"dispatcher exited with {code}; restarting in {delay:g} s", file=sys.stderr, flush=True)
        time.sleep(delay)
