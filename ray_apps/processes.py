"""Background services that the platform starts: each in its own process session.

A service runs as the leader of a new session, so everything it spawns (Ray's GCS,
raylet, dashboard and workers; MLflow's uvicorn workers) shares that session id.
Stopping a service stops exactly that session and nothing else on the machine:
`oppen down` never touches a Ray or MLflow that `oppen up` did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass
class Service:
    name: str
    pid: int          # session leader; its pid is also the session id
    cmd: list[str]
    log: str
    started_at: float  # wall-clock start, for people reading services.json; identity is start_ticks
    # The leader's start in clock ticks since boot: what tells it from a later process that
    # reuses its pid. (psutil's create_time adds a boot time derived from the wall clock, which
    # drifts on VMs: seconds per minute measured here, enough to lose track of a running head.)
    start_ticks: int | None = None

    def processes(self) -> list[psutil.Process]:
        """Live processes of this service's session (empty once it is gone)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def alive(self) -> bool:
        try:
            leader = psutil.Process(self.pid)
            if leader.status() == psutil.STATUS_ZOMBIE:
                return False
            ticks = start_ticks(self.pid)
            if self.start_ticks is not None and ticks is not None:
                return ticks == self.start_ticks
            return leader.cmdline() == self.cmd  # no /proc, or a registry written before start_ticks
        except psutil.Error:
            return False

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree, each process counted whole (pages shared between
        its processes, e.g. Python and Ray's libraries, count once per process)."""
        return self._tree_total(lambda proc: proc.memory_info().rss)

    def pss_bytes(self) -> int:
        """What the tree costs the machine: each shared page split among the processes that map it."""
        return self._tree_total(lambda proc: proc.memory_full_info().pss)

    def _tree_total(self, measure) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += measure(proc)
            except (psutil.Error, AttributeError):  # gone meanwhile; no PSS outside Linux
                pass
        return total


class ServiceRegistry:
    """What `oppen up` started, in a JSON file in the data dir (survives the CLI)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "services.json"

    def load(self) -> dict[str, Service]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {name: Service(**entry) for name, entry in raw.items()}

    def save(self, services: dict[str, Service]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(s) for n, s in services.items()}, indent=2))
        os.replace(tmp, self.path)

    def running(self) -> dict[str, Service]:
        return {n: s for n, s in self.load().items() if s.alive()}


# What a service creates (databases, logs, Ray's sockets and session files, its children's files)
# is readable by its owner only.
PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """`path` created if missing and made 0700: only its owner may list or enter it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def spawn(name: str, cmd: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> Service:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True, umask=PRIVATE_UMASK)
    return Service(name=name, pid=proc.pid, cmd=cmd, log=str(log_path),
                   started_at=psutil.Process(proc.pid).create_time(), start_ticks=start_ticks(proc.pid))


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # fields[0] is field 3 (state)
    except (OSError, ValueError, IndexError):
        return None


def stop(service: Service, *, grace_s: float = 15.0) -> int:
    """SIGTERM the whole session, SIGKILL what is left after `grace_s`. Returns the count stopped."""
    procs = service.processes()
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


@dataclass
class PortHolder:
    port: int
    pid: int | None
    name: str
    cmdline: str

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.name}: {self.cmdline[:120]})" if self.pid else "another process"
        return f"port {self.port} is held by {who}"


def port_holder(port: int) -> PortHolder | None:
    """Who listens on `port`, or None if it is free to bind."""
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            try:
                proc = psutil.Process(conn.pid) if conn.pid else None
                return PortHolder(port, conn.pid, proc.name() if proc else "?",
                                  " ".join(proc.cmdline()) if proc else "")
            except psutil.Error:
                return PortHolder(port, conn.pid, "?", "")
    return None


def wait_until(check, *, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by `pids` (Linux /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, decode in (("/proc/net/tcp", _ipv4), ("/proc/net/tcp6", _ipv6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    found.add((decode(address), int(port, 16)))
    return found


def _ipv4(hex_address: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])


def _ipv6(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)  # four little-endian 32-bit words
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
