"""Ray Train's controller, run in the process that calls `fit()` instead of in an actor of its own.

Ray Train V2 starts its `TrainController` as an actor: one more process on a job's critical path,
which starts Python, imports Ray and Ray Train (~1.5 s on 2 cores, `benchmarks/startup.py`) before
the workers are even asked for, while the caller only waits for its result. The actor is owned by
the caller, so it dies with it: running the same controller class in the caller's event loop keeps
what it does (placement group, worker group, polling, restarts, checkpoints, callbacks) and drops
the process.

Two things differ from the actor and are handled here:
- workers are handed no controller actor; Ray Train uses it only for
  `ray.train.get_all_reported_checkpoints`, which these trainers don't call;
- Ray's Ctrl-C handler, which asked the controller actor to abort, is not installed: a KeyboardInterrupt
  ends the caller, and the workers it owns end with it.
"""

from __future__ import annotations

import asyncio

import ray
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.worker_group import WorkerGroup


class CallerWorkerGroup(WorkerGroup):
    """Ray's worker group, initialised without a controller actor to hand the workers."""

    def _init_train_context_on_workers(self, workers, sync_actor, train_context_args) -> None:
        ray.get([
            worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context,
                distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor,
                storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate,
                controller_actor=None,
                **{arg: values[i] for arg, values in train_context_args.items()},
            )
            for i, worker in enumerate(workers)
        ])
        self._decorate_worker_log_file_paths(workers)


class CallerController(TrainController):
    worker_group_cls = CallerWorkerGroup


def run_in_caller(**controller_kwargs):
    """What `DataParallelTrainer._initialize_and_run_controller` returns, with the controller run here."""
    controller = CallerController(**controller_kwargs)
    asyncio.run(controller.run())
    return controller.get_result()
