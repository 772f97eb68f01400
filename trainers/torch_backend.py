"""Ray Train's torch set-up, with torch imported only in the processes that compute.

Ray's `TorchTrainer` and `TorchConfig` import torch wherever they are held: in the job's driver,
which builds the trainer, and in Ray Train's controller, which sets the gang up. Neither computes,
and on a small machine each import is 1-2 s of a job's start (`benchmarks/startup.py`). The trainer
built here is Ray's `DataParallelTrainer` with this module's backend, which is Ray's own torch
backend with the imports moved to where they are used:

- a gang of several workers is set up by Ray's `_TorchBackend` (imported by the controller then):
  the same process group, environment and CUDA device;
- a single worker has no peers to join: it gets Ray's torch environment (RANK, WORLD_SIZE, ...)
  and CUDA device, and no process group, as in a one-worker Tune trial (trainers.session). Ray's
  `prepare_model` and `prepare_data_loader` wrap nothing at world size 1 either way; without CUDA
  nothing of `ray.train.torch` is imported (its package costs a worker 0.25 s beyond torch).

Each actor Ray Train starts is a process that imports Ray on the job's critical path; the trainer
runs Ray Train's controller in its caller instead of an actor (trainers.train_controller) and leaves
out the two actors that guard nothing in a job (see `TorchTrainer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def _ray_torch(name: str, **kwargs):
    """Call a function of Ray's torch config module on a worker (importing torch there)."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _single_worker_env() -> None:
    """Ray's `_set_torch_distributed_env_vars` for a gang of one. Where there is no CUDA device to pick,
    set here: importing `ray.train.torch` for them was 0.25 s of the worker's start on 2 cores."""
    if _cuda():
        _ray_torch("_set_torch_distributed_env_vars")
        return
    import os

    import ray.train

    context = ray.train.get_context()
    os.environ.update({"LOCAL_RANK": str(context.get_local_rank()),
                       "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
                       "NODE_RANK": str(context.get_node_rank()), "RANK": str(context.get_world_rank()),
                       "WORLD_SIZE": str(context.get_world_size()), "ACCELERATE_TORCH_DEVICE": "cpu"})


def _single_worker_shutdown() -> None:
    """Ray's `_shutdown_torch` for a gang of one: it empties CUDA's cache; without CUDA there is none."""
    if _cuda():
        _ray_torch("_shutdown_torch")


class CudaDeviceContext:
    """Ray's `TorchConfigContextManager` around `train_func`: the worker's CUDA device, if any."""

    def __enter__(self):
        self._inner = None
        if not _cuda():
            return None
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc) -> bool:
        return self._inner.__exit__(*exc) if self._inner is not None else False


@dataclass
class TorchBackendConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields; torch is imported where the backend runs."""

    backend: str | None = None   # gloo or nccl; None: nccl with GPUs, else gloo (Ray's rule)
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return TorchBackend

    @property
    def train_func_context(self):
        return CudaDeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def ray_config(self):
        from ray.train.torch.config import TorchConfig

        return TorchConfig(backend=self.backend, init_method=self.init_method, timeout_s=self.timeout_s)


class TorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    @staticmethod
    def _ray_backend():
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()

    def on_start(self, worker_group, backend_config: TorchBackendConfig) -> None:
        if len(worker_group) > 1:
            self._ray_backend().on_start(worker_group, backend_config.ray_config())
        else:
            worker_group.execute(_single_worker_env)

    def on_shutdown(self, worker_group, backend_config: TorchBackendConfig) -> None:
        if len(worker_group) > 1:
            self._ray_backend().on_shutdown(worker_group, backend_config.ray_config())
        else:
            worker_group.execute(_single_worker_shutdown)


class TorchTrainer(DataParallelTrainer):
    """Ray Train's data-parallel trainer with `TorchBackendConfig`: what `ray.train.torch.TorchTrainer`
    runs, minus torch in the driver and the controller, with the controller run in the caller's
    process, and minus two actors where they guard nothing:

    - Ray Data's `DatasetManager`, when there are no Ray Data inputs;
    - the detached `PlacementGroupCleaner`, which removes the run's placement groups if the process
      running the controller dies while the job lives on, when `driver_owns_run`: that process is the
      Ray job's driver, and Ray removes a finished job's placement groups. A Tune trial's process is
      restarted in the same job, so a run inside a trial keeps its cleaner.

    `on_workers_started` is called in the caller's process each time the worker group is up."""

    def __init__(self, train_loop_per_worker, *, use_gpu: bool, driver_owns_run: bool,
                 on_workers_started: Callable[[], None] | None = None, **kwargs):
        self._driver_owns_run = driver_owns_run
        self._on_workers_started = on_workers_started
        super().__init__(train_loop_per_worker,
                         backend_config=TorchBackendConfig(backend="nccl" if use_gpu else "gloo"), **kwargs)

    def _initialize_and_run_controller(self, **controller_kwargs):
        from trainers.train_controller import run_in_caller

        return run_in_caller(**controller_kwargs)

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        idle = ((DatasetsCallback,) if not self.datasets else ()) + (
            (PlacementGroupCleanerCallback,) if self._driver_owns_run else ())
        kept = [c for c in super()._create_default_callbacks() if not isinstance(c, idle)]
        # First: it fires before the backend's set-up, which imports torch on the workers.
        return ([WorkersStarted(self._on_workers_started)] if self._on_workers_started else []) + kept


class WorkersStarted(WorkerGroupCallback):
    """Calls `call` in the controller's process each time the worker group is up."""

    def __init__(self, call: Callable[[], None]):
        self._call = call

    def after_worker_group_start(self, worker_group) -> None:
        self._call()
