"""Bad input to the MNIST job: a clear message and a non-zero exit, never a traceback."""

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_trainer(*args, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainers.mnist", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,env_extra,message", [
    (["--epochs", "2", "--bogus-flag", "1"], {}, "unrecognized arguments: --bogus-flag"),
    (["--epochs", "-1"], {}, "--epochs must be at least 1, got -1"),
    (["--epochs", "two"], {}, "argument --epochs: invalid int value: 'two'"),
    (["--data-dir", "/nonexistent/oppen"], {}, "data dir /nonexistent/oppen does not exist"),
    (["--epochs", "1"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "is unreachable"),
    (["--epochs", "1"], {"OPPEN_COSTS_FILE": "/nonexistent/costs.yaml"}, "cannot read the price catalog"),
])
def test_bad_input_fails_cleanly(args, env_extra, message, data_dir):
    env = {"OPPEN_DATA_DIR": str(data_dir), **{k: v.format(port=closed_port()) for k, v in env_extra.items()}}
    proc = run_trainer(*args, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_without_a_run_is_explained(data_dir):
    proc = run_trainer("--resume", "--no-tracking", env={"OPPEN_DATA_DIR": str(data_dir)})
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr


def run_oppen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ray_apps.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["train", "mnist", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["train", "mnist", "--nope"], "unrecognized arguments: --nope"),
    (["train", "resnet"], "invalid choice: 'resnet'"),
])
def test_oppen_train_rejects_bad_input_before_touching_ray(args, message):
    proc = run_oppen(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_oppen_reports_a_bad_settings_file(tmp_path):
    bad = tmp_path / "platform.yaml"
    bad.write_text("ray:\n  dashboard_port: 99999\n")
    proc = run_oppen("--config", str(bad), "status")
    assert proc.returncode == 2 and "ray.dashboard_port" in proc.stderr and str(bad) in proc.stderr


def test_the_result_line_is_read_when_a_forwarded_worker_line_lands_right_after_it(capsys):
    """Seen in a search's log: Ray forwarded a worker's line between the JSON and its newline."""
    from trainers.driver import RESULT, print_result, result_of

    print_result({"trials": 1, "stopped_by_budget": True})
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.endswith("}\n")                          # one line, one write
    glued = line.rstrip("\n") + "\x1b[36m(PlacementGroupCleaner pid=1)\x1b[0m Detected that the controller is dead."
    assert result_of(["x", glued, "y"]) == {"trials": 1, "stopped_by_budget": True}
    assert result_of([f"{RESULT} not json"]) == {} and result_of([f"{RESULT} [1, 2]"]) == {}
