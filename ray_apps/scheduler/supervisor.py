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


def supervise(cmd: list[str]) -> int:
    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:
        child = subprocess.Popen(cmd)
        code = child.wait()
        if stopping:
            return 0
        print(f"dispatcher exited with {code}; restarting in {RESTART_DELAY_S:g} s", file=sys.stderr, flush=True)
        time.sleep(RESTART_DELAY_S)
