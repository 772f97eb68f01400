"""Submit a catalogued trainer to Ray as a job and follow it to the end.

The job is the same command a user could type (`python -m trainers.mnist ...`);
the platform adds validation against `trainers.specs`, an MLflow run created up
front (so Ray's job metadata names it), and a feasibility check so a request the
cluster can never hold is refused at once instead of waiting silently in Ray.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ray_apps.ray_client import PlatformError, job_client, mlflow_healthy
from ray_apps.config import PROJECT_ROOT, Settings
from ray_apps.scheduler.policy import Gang, infeasibility
from ray_apps.topology import Topology
from trainers.driver import PROGRESS, result_of  # the lines the trainers print
from trainers.runtime import PREPROCESS_GROUP_ENV, new_run_name
from trainers.specs import build_config, spec_for, validated_params

# Never upload platform state, environments or databases with the job's working dir (Ray already
# skips .git and .venv).
WORKING_DIR_EXCLUDES = [".oppen", ".venv*", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "*.db",
                        "*.whl", "mlruns", "benchmarks/results"]


@dataclass
class Submission:
    submission_id: str
    trainer: str
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    entrypoint: str


@dataclass
class JobOutcome:
    status: str                  # Ray's terminal status: SUCCEEDED, FAILED, STOPPED
    result: dict[str, Any] = field(default_factory=dict)   # the trainer's OPPEN_RESULT line
    log_tail: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def entrypoint_for(trainer: str, params: dict[str, Any], extra: list[str] = (),
                   search: dict[str, Any] | None = None) -> str:
    """The trainer's command line from validated params, or with `search` (checked settings, see
    trainers.tune.check_search) the Ray Tune search over it. Ray runs an entrypoint through a shell:
    every word is quoted, so no value can add a word, a flag or a command."""
    spec_for(trainer)  # a catalogued trainer only: its name becomes a module path
    flags = []
    for key, value in params.items():
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    if search is None:
        return shlex.join(["python", "-m", f"trainers.{trainer}", *flags, *extra])
    from trainers.tune import search_flags

    return shlex.join(["python", "-m", "trainers.tune", trainer, *flags, *search_flags(search), *extra])


def check_feasible(settings: Settings, spec: Any) -> None:
    """Refuse a gang the cluster can never hold (Ray would leave it PENDING silently)."""
    from ray_apps.scheduler.capacity import read_capacity

    # Fully scaled out: the nodes there are and those the worker groups may still add.
    reason = infeasibility(Gang.of(spec), read_capacity(settings, settings.topology()).potential_nodes())
    if reason:
        raise PlatformError(f"infeasible request: it {reason} (Ray at {settings.dashboard_url}). To fix: ask "
                            "for fewer workers or less per worker, or add capacity to the cluster.")


def submit_training(settings: Settings, trainer: str, params: dict[str, Any], *,
                    metadata: dict[str, str] | None = None) -> Submission:
    """Validate, create the MLflow run, and hand the job to Ray around the queue, as a plain `ray job
    submit` would (the dispatcher then adopts it): for tests and benchmarks that measure a bare Ray job.
    The platform's own front-ends queue (`Queue.submit`). Raises SpecError / PlatformError."""
    spec = build_config(trainer, params)
    check_feasible(settings, spec)
    submission_id = new_run_name(trainer)
    run_id, run_url = create_run(settings, trainer, submission_id)
    clean = validated_params(spec, params)
    entrypoint = entrypoint_for(trainer, clean, ["--run-name", submission_id, "--mlflow-run-id", run_id])
    submit_entrypoint(settings, submission_id, entrypoint, {"trainer": trainer, "mlflow_run_id": run_id,
                                                            **(metadata or {})})
    return Submission(submission_id, trainer, run_id, run_url, entrypoint)


def submit_entrypoint(settings: Settings, submission_id: str, entrypoint: str, metadata: dict[str, str],
                      topology: Topology | None = None, client=None) -> None:
    """Hand a trainer command to Ray with this project as its working dir. A caller that holds them
    passes the cluster's `topology` and its Jobs API `client` (a new client first asks the dashboard
    for its version)."""
    (client or job_client(settings.dashboard_url)).submit_job(
        entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES,
                     "env_vars": job_env_vars(settings, topology)})


def job_env_vars(settings: Settings, topology: Topology | None = None) -> dict[str, str]:
    """The job's environment, in its driver and in every worker and actor Ray starts for it. On a
    local head it names its GCS: Ray's code that finds the cluster by itself (the placement-group
    cleaner of a multi-worker run in a Tune trial, through the state API) otherwise fails, and leaks
    the placement groups it guards, once another Ray runs on the same machine. A remote head
    (KubeRay) is one Ray per pod. On a cluster with a CPU worker group it names that group, where Ray
    Data stages run."""
    env = settings.job_env()
    # Ray Train's controller polls its workers this often (default 2 s): a finished run is noticed,
    # and its driver goes on to log the model, within 0.2 s instead of up to two.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # Ray folds worker lines that differ only in their numbers into one "[repeated Nx]" line: short
    # epochs' progress lines ("epoch 2/3", "epoch 3/3") would reach the job's log as one.
    env["RAY_DEDUP_LOGS"] = "0"
    if settings.is_local:
        env["RAY_ADDRESS"] = settings.gcs_address
        # Ray Train's preemption watcher (an actor per worker node, polling Ray for node drains) is for
        # cloud nodes reclaimed under a job; this machine's nodes are never drained while they hold
        # work, and each watcher is one more process to start with every job.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    group = (topology or settings.topology()).preprocess_group
    if group:  # Ray Data stages go to the CPU group's nodes (trainers.ray_pipeline.stage_options)
        env[PREPROCESS_GROUP_ENV] = group
    return env


def create_run(settings: Settings, trainer: str, run_name: str, tags: dict[str, str] | None = None, *,
               checked: bool = False) -> tuple[str, str]:
    """Create the MLflow run before the job exists, so Ray's job metadata can name it. `checked`: the
    caller has just found MLflow healthy (the dispatcher, once per cycle), so no second probe."""
    if not checked and not mlflow_healthy(settings.tracking_uri):
        raise PlatformError(f"MLflow at {settings.tracking_uri} is unreachable. To fix: run `oppen up` "
                            "or set MLFLOW_TRACKING_URI to a running server.")
    from trainers.tracking import open_new_run

    run_id, exp_id = open_new_run(settings.tracking_uri, experiment=trainer, run_name=run_name,
                                  tags={"oppen.trainer": trainer, "ray.submission_id": run_name, **(tags or {})})
    return run_id, f"{settings.tracking_uri}/#/experiments/{exp_id}/runs/{run_id}"


def follow(settings: Settings, submission_id: str, *, on_progress: Callable[[str], None] = print,
           poll_s: float = 1.0, timeout_s: float | None = None) -> JobOutcome:
    """Poll the job until it ends, passing each new trainer progress line to `on_progress`."""
    client = job_client(settings.dashboard_url)
    seen, last_status, start = 0, None, time.monotonic()
    shown: set[str] = set()
    while True:
        status = client.get_job_status(submission_id)
        if status != last_status:
            on_progress(f"job {submission_id}: {status.value} ({time.monotonic() - start:.0f} s)")
            last_status = status
        lines = client.get_job_logs(submission_id).splitlines()
        for line in lines[seen:]:
            text = line[line.find(PROGRESS):] if PROGRESS in line else None
            if text and text not in shown:  # Ray may echo a worker's line twice
                shown.add(text)
                on_progress(text)
        seen = len(lines)
        if status.is_terminal():
            result = result_of(lines)
            return JobOutcome(status=status.value, result=result, log_tail=lines[-30:],
                              seconds=time.monotonic() - start)
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return JobOutcome(status=status.value, log_tail=lines[-30:], seconds=time.monotonic() - start)
        time.sleep(poll_s)


def follow_queued(queue, job_id: str, *, on_progress: Callable[[str], None] = print, poll_s: float = 1.0,
                  timeout_s: float | None = None) -> JobOutcome:
    """Follow a queued job through its wait and every attempt (a preempted job resumes as a new Ray
    job) to its end; the outcome carries the queue's final state and the last attempt's result. With
    `timeout_s`, it returns by then with the job's state at that moment (the job goes on)."""
    from ray_apps.scheduler.states import JobState

    start, said, followed, outcome = time.monotonic(), None, set(), JobOutcome(status="QUEUED")

    def left() -> float | None:
        return None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - start))

    while True:
        job = queue.get(job_id)
        attempt = job.ray_submission_id
        if attempt and attempt not in followed and job.state in (JobState.RUNNING, JobState.SUCCEEDED,
                                                                 JobState.FAILED):
            followed.add(attempt)
            outcome = follow(queue.settings, attempt, on_progress=on_progress, poll_s=poll_s, timeout_s=left())
            continue
        if job.state.is_terminal() or left() == 0.0:
            return dataclasses.replace(outcome, status=job.state.value, seconds=time.monotonic() - start)
        status = f"{job.state.value}: {job.message}" if job.message else job.state.value
        # Ray has said the attempt ended; the queue's record catches up within a dispatcher cycle.
        catching_up = attempt in followed and job.state is JobState.RUNNING
        if status != said and not catching_up:
            on_progress(f"job {job_id}: {status}")
            said = status
        time.sleep(poll_s)
