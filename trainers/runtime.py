"""What a trainer needs to know about the job it runs in, without importing the platform."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

# The Ray node label naming a worker node's group: both renderings of the topology set it
# (ray_apps/topology.py), and preprocessing stages select the CPU group by it (trainers/ray_pipeline.py).
NODE_GROUP_LABEL = "oppen.io/node-group"
# The job environment variable that names the group preprocessing runs on (set by the platform).
PREPROCESS_GROUP_ENV = "OPPEN_PREPROCESS_GROUP"

# The Ray job supervisor hands the driver its job config, submission id included.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_metadata() -> dict[str, str]:
    """Ray job metadata (submission id, tenant, priority...) or {} outside a Ray job."""
    try:
        return dict(json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}")).get("metadata") or {})
    except (ValueError, AttributeError):
        return {}


def new_run_name(trainer: str) -> str:
    """`<trainer>-<time>-<random>`: the run's name, checkpoint folder and, when the platform
    submits it, its Ray submission id and queue job id."""
    return f"{trainer}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def checkpoint_root(data_dir: Path) -> Path:
    return data_dir / "checkpoints"


def latest_run_name(data_dir: Path, trainer: str) -> str | None:
    """The most recently started run of `trainer` that left state to resume from."""
    pattern = re.compile(rf"^{re.escape(trainer)}-")
    runs = [p for p in checkpoint_root(data_dir).glob(f"{trainer}-*")
            if pattern.match(p.name) and (p / RUN_RECORD).exists()]
    return max(runs, key=lambda p: (p / RUN_RECORD).stat().st_mtime).name if runs else None


RUN_RECORD = "oppen_run.json"


def read_run_record(run_dir: Path) -> dict:
    return json.loads((run_dir / RUN_RECORD).read_text())


def write_run_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / RUN_RECORD)


def worker_device(in_trial: bool = False):
    """The torch device a worker computes on: where CUDA is there, its GPU (Ray Train's choice; in a
    Tune trial's own process, cuda:0, as Ray points CUDA_VISIBLE_DEVICES at the trial's GPUs), else
    the CPU. On a CPU-only box the GPU group's GPUs are logical: Ray hands the worker a GPU id, and its
    own device choice would then be a CUDA device that does not exist."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if in_trial:
        return torch.device("cuda", 0)
    import ray.train.torch

    device = ray.train.torch.get_device()
    return device[0] if isinstance(device, list) else device
