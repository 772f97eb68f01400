import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import psutil

from ray_apps.processes import ServiceRegistry, port_holder, spawn, start_ticks, stop

# A service that forks a child, like `ray start` spawning its GCS and raylet.
PARENT_WITH_CHILD = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']); time.sleep(600)"


def test_stop_takes_the_whole_session_and_nothing_else(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        svc = spawn("demo", [sys.executable, "-c", PARENT_WITH_CHILD], log_path=tmp_path / "demo.log")
        deadline = time.time() + 10
        while len(svc.processes()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        procs = svc.processes()
        assert len(procs) == 2 and svc.alive()
        assert stop(svc, grace_s=5) == 2
        assert not svc.alive() and svc.processes() == []
        assert psutil.pid_exists(bystander.pid) and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_registry_forgets_dead_services(tmp_path):
    reg = ServiceRegistry(tmp_path)
    svc = spawn("short", [sys.executable, "-c", "pass"], log_path=tmp_path / "s.log")
    reg.save({"short": svc})
    psutil.Process(svc.pid).wait(10)
    assert "short" in reg.load() and reg.running() == {}


def test_port_holder_names_the_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        holder = port_holder(port)
        assert holder is not None and holder.pid == psutil.Process().pid
        assert f"port {port} is held by pid {holder.pid}" in holder.describe()
    assert port_holder(port) is None


def test_a_running_service_is_known_by_its_start_ticks_not_the_wall_clock(tmp_path):
    svc = spawn("demo", [sys.executable, "-c", "import time; time.sleep(600)"], log_path=tmp_path / "d.log")
    try:
        assert svc.start_ticks == start_ticks(svc.pid) and svc.start_ticks is not None
        # The wall-clock start drifted by an hour (a VM's clock): still the same process.
        assert replace(svc, started_at=svc.started_at - 3600).alive()
        # Same pid, another start: a later process that reuses the pid is not the service.
        assert not replace(svc, start_ticks=svc.start_ticks - 1).alive()
        # A registry written before start_ticks existed: the command line decides.
        assert replace(svc, start_ticks=None).alive()
        assert not replace(svc, start_ticks=None, cmd=["something", "else"]).alive()
    finally:
        stop(svc, grace_s=5)
    assert not svc.alive()


def test_listening_sockets_are_read_from_proc_with_their_addresses():
    import socket

    from ray_apps.processes import listening_sockets

    with socket.socket() as loopback, socket.socket(socket.AF_INET6) as everywhere, socket.socket() as idle:
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        everywhere.bind(("::", 0))
        everywhere.listen()
        idle.bind(("127.0.0.1", 0))  # bound, not listening: not a listener
        found = listening_sockets([os.getpid()])
        assert ("127.0.0.1", loopback.getsockname()[1]) in found
        assert ("::", everywhere.getsockname()[1]) in found
        assert all(port != idle.getsockname()[1] for _, port in found)


def test_private_dir_is_made_owner_only(tmp_path):
    from ray_apps.processes import private_dir

    (tmp_path / "data").mkdir(mode=0o755)
    assert private_dir(tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert private_dir(tmp_path / "new" / "deep").stat().st_mode & 0o777 == 0o700
