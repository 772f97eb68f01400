"""The platform's MLflow server runs as one process: MLflow's CLI prepares, then uvicorn takes its
place (ray_apps.mlflow_server). A real server on a free port and a temporary SQLite store."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_answers_from_the_process_that_was_started(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_apps.mlflow_server", f"--backend-store-uri=sqlite:///{tmp_path / 'm.db'}",
         f"--artifacts-destination={tmp_path / 'a'}", "--serve-artifacts", "--host=127.0.0.1", f"--port={port}",
         "--workers=1"], env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.read() == b"OK"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.5)
        server = psutil.Process(proc.pid)
        assert "uvicorn" in server.cmdline()  # exec'd in place: the started PID is the server
        assert server.children(recursive=True) == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
