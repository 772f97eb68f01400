"""Keeps the dispatcher alive: runs it as a child process and restarts it when it dies.

`oppen up` starts this supervisor as a managed service; `kill -9` of the dispatcher
costs at most a restart delay, and the stateless dispatcher picks up from the store.

    python -m ray_apps.scheduler.supervisor -- python -m ray_apps.cli dispatcher

It imports nothing beyond the standard library (~10 MB at rest, where `oppen dispatcher
--supervise` holds the CLI's imports, ~50 MB).
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd = args[1:] if args[:1] == ["--"] else args
    if not cmd:
        print("usage: python -m ray_apps.scheduler.supervisor -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    return supervise(cmd)


def dispatcher_command(config: str | None) -> list[str]:
    return [sys.executable, "-m", "ray_apps.cli", *(["--config", config] if config else []), "dispatcher"]


def supervised(cmd: list[str]) -> list[str]:
    """`cmd` under this supervisor, as `oppen up` starts the dispatcher."""
    return [sys.executable, "-m", "ray_apps.scheduler.supervisor", "--", *cmd]


if __name__ == "__main__":
    sys.exit(main())
