"""Jobs that reached Ray without the queue (a plain `ray job submit -- python -m trainers.X`, a
RayJob, a `python -m trainers.tune` search) are adopted: recorded in the store from Ray's job list and
the job's metadata, so they are metered, reported, shown and cancellable like queued jobs.

An adopted job keeps Ray's submission id as its id, its tenant from the job's metadata
(`tenant`), else `ADOPTED_TENANT`, and the priority `ADOPTED_PRIORITY`: the queue never
preempts or resubmits it (it did not start it), but its resources count in its tenant's usage.
Its gang is read from the trainer flags of its entrypoint; only catalogued trainers are adopted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from dataclasses import dataclass

from trainers.specs import TRAINERS, SpecError, add_arguments, config_from_args

log = logging.getLogger("oppen.adoption")
ADOPTED_PRIORITY = "outside-queue"
ADOPTED_TENANT = "outside-queue"
ADOPTED_MESSAGE = "submitted outside the queue; adopted from Ray's job list"


@dataclass(frozen=True)
class Adoptable:
    trainer: str
    params: dict
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def parse_entrypoint(entrypoint: str) -> Adoptable | None:
    """`python -m trainers.mnist --num-workers 2 ...` -> what it runs and holds; None if not a trainer."""
    try:
        argv = shlex.split(entrypoint or "")
    except ValueError:
        return None
    if "-m" not in argv:
        return None
    i = argv.index("-m")
    module = argv[i + 1] if i + 1 < len(argv) else ""
    if not module.startswith("trainers."):
        return None
    name, rest = module.split(".", 1)[1], argv[i + 2:]
    if name == "tune":  # a search: adopted under its trainer, at one trial's gang (a lower bound)
        if not rest or rest[0] not in TRAINERS:
            return None
        name, rest = rest[0], rest[1:]
    if name not in TRAINERS:
        return None
    cls = TRAINERS[name]
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(parser, cls, with_defaults=False)
    try:
        args, _ = parser.parse_known_args(rest)
        config = config_from_args(cls, args)
    except (argparse.ArgumentError, SpecError, TypeError, ValueError):
        return None
    given = {k: v for k, v in vars(args).items() if v is not None}
    full = dataclasses.asdict(config)
    return Adoptable(name, given, int(full["num_workers"]), float(full["cpus_per_worker"]),
                     float(full.get("gpus_per_worker", 0.0)))


def adopt_unknown(store, ray_jobs, known_ids: set[str]) -> list[str]:
    """Record every catalogued trainer job in `ray_jobs` (Ray's JobDetails) whose submission id the
    store does not know. Returns the ids adopted."""
    adopted = []
    for info in ray_jobs:
        sid = info.submission_id
        if not sid or sid in known_ids or getattr(info.type, "value", info.type) != "SUBMISSION":
            continue
        what = parse_entrypoint(info.entrypoint)
        if what is None:
            continue
        meta = info.metadata or {}
        started = (info.start_time or 0) / 1000 or None
        ended = (info.end_time or 0) / 1000 or None
        status = getattr(info.status, "value", str(info.status))
        if store.adopt(id=sid, trainer=what.trainer, params=what.params, tenant=meta.get("tenant") or ADOPTED_TENANT,
                       priority=ADOPTED_PRIORITY, workers=what.workers, cpus_per_worker=what.cpus_per_worker,
                       gpus_per_worker=what.gpus_per_worker, ray_status=status, started_at=started, ended_at=ended,
                       mlflow_run_id=meta.get("mlflow_run_id"), message=ADOPTED_MESSAGE):
            adopted.append(sid)
            log.info("adopted %s (%s, %s) from Ray's job list", sid, what.trainer, status)
    return adopted
