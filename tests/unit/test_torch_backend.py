"""A trainer's driver builds Ray Train without importing torch (trainers/torch_backend.py), and leaves
out the actors that guard nothing in a job: the torch set-up runs where the workers are."""
import subprocess
import sys
from pathlib import Path

from ray.train import ScalingConfig

from trainers.torch_backend import TorchBackendConfig, TorchTrainer

ROOT = Path(__file__).resolve().parents[2]


def test_a_driver_builds_its_trainer_without_importing_torch(tmp_path):
    """In a fresh interpreter, as a job's driver is: torch stays out of sys.modules."""
    code = f"""
import sys
from pathlib import Path
from trainers import driver
from trainers.mnist import train_func
from trainers.specs import MnistConfig
ctx = driver.RunContext("mnist", "t", Path({str(tmp_path)!r}), "", "", None, False)
trainer = driver.torch_trainer(train_func, {{}}, MnistConfig(num_workers=2), ctx)
print(type(trainer).__module__, type(trainer.backend_config).__name__, trainer.backend_config.backend,
      "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["trainers.torch_backend", "TorchBackendConfig", "gloo", "False"]


def test_the_actors_that_guard_nothing_are_left_out_only_where_they_guard_nothing():
    def names(trainer):
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    one = ScalingConfig(num_workers=1)
    job = names(TorchTrainer(lambda: None, use_gpu=False, driver_owns_run=True, scaling_config=one))
    assert {"BackendSetupCallback", "AcceleratorSetupCallback"} <= job
    assert not {"DatasetsCallback", "PlacementGroupCleanerCallback"} & job
    # A run inside a Tune trial keeps its cleaner; a run with Ray Data inputs keeps the dataset manager.
    trial = names(TorchTrainer(lambda: None, use_gpu=False, driver_owns_run=False, scaling_config=one,
                               datasets={"train": lambda: None}))
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback", "BackendSetupCallback"} <= trial


def test_the_backend_config_is_ray_s_torch_config_where_a_gang_needs_one():
    config = TorchBackendConfig(backend="nccl", timeout_s=60)
    ray_config = config.ray_config()
    assert (type(ray_config).__name__, ray_config.backend, ray_config.init_method, ray_config.timeout_s) == (
        "TorchConfig", "nccl", "env", 60)


def test_the_workers_started_hook_comes_before_the_backend_set_up_and_fires_per_start():
    started = []
    trainer = TorchTrainer(lambda: None, use_gpu=False, driver_owns_run=True,
                           scaling_config=ScalingConfig(num_workers=1), on_workers_started=lambda: started.append(1))
    callbacks = trainer._create_default_callbacks()
    names = [type(c).__name__ for c in callbacks]
    # First: the driver's own work then runs beside the workers' torch import, not after it.
    assert names[0] == "WorkersStarted" and names.index("BackendSetupCallback") > 0
    callbacks[0].after_worker_group_start(None)
    callbacks[0].after_worker_group_start(None)  # a restarted group
    assert started == [1, 1]
    plain = TorchTrainer(lambda: None, use_gpu=False, driver_owns_run=True,
                         scaling_config=ScalingConfig(num_workers=1))
    assert "WorkersStarted" not in {type(c).__name__ for c in plain._create_default_callbacks()}


def test_the_trainer_runs_ray_train_s_controller_in_the_calling_process(monkeypatch):
    """The controller Ray would start as an actor is built and run here; its result is fit's."""
    import trainers.train_controller as train_controller

    ran = {}

    class Recorded(train_controller.CallerController):
        def __init__(self, **kwargs):
            ran["kwargs"] = kwargs

        async def run(self):
            ran["run"] = True

        def get_result(self):
            return "result"

    monkeypatch.setattr(train_controller, "CallerController", Recorded)
    trainer = TorchTrainer(lambda: None, use_gpu=False, driver_owns_run=True,
                           scaling_config=ScalingConfig(num_workers=1))
    assert trainer._initialize_and_run_controller(train_fn_ref="fn", callbacks=[]) == "result"
    assert ran == {"kwargs": {"train_fn_ref": "fn", "callbacks": []}, "run": True}
    assert train_controller.CallerController.worker_group_cls.__name__ == "CallerWorkerGroup"


ENV_KEYS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_TORCH_DEVICE")


def test_a_gang_of_one_on_the_cpu_gets_ray_s_torch_environment(monkeypatch):
    """The same variables Ray's `_set_torch_distributed_env_vars` sets, from the same train context."""
    import os
    from types import SimpleNamespace

    import ray.train

    from trainers.torch_backend import _ray_torch, _single_worker_env

    context = SimpleNamespace(get_local_rank=lambda: 3, get_local_world_size=lambda: 4, get_node_rank=lambda: 1,
                              get_world_rank=lambda: 7, get_world_size=lambda: 8)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    import ray.train.torch
    import torch

    # Ray's device lookup refuses to run outside a worker; on a box without CUDA it is the CPU.
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    _single_worker_env()
    ours = {key: os.environ.pop(key) for key in ENV_KEYS}
    _ray_torch("_set_torch_distributed_env_vars")
    assert ours == {key: os.environ.pop(key) for key in ENV_KEYS}
    assert ours["RANK"] == "7" and ours["ACCELERATE_TORCH_DEVICE"] == "cpu"


def test_a_gang_of_one_on_the_cpu_never_imports_ray_train_torch(tmp_path):
    """What a one-worker run on the CPU calls on its worker: set-up, the model, the train_func context,
    shut-down; in a fresh interpreter, `ray.train.torch` stays out of sys.modules."""
    code = """
import sys
from types import SimpleNamespace
import ray.train
import torch
ray.train.get_context = lambda: SimpleNamespace(get_local_rank=lambda: 0, get_local_world_size=lambda: 1,
    get_node_rank=lambda: 0, get_world_rank=lambda: 0, get_world_size=lambda: 1)
from trainers.session import Session
from trainers.torch_backend import CudaDeviceContext, _single_worker_env, _single_worker_shutdown
_single_worker_env()
with CudaDeviceContext():
    Session(rank=0, world=1, in_trial=False).prepare_model(torch.nn.Linear(2, 2), torch.device("cpu"))
_single_worker_shutdown()
print("ray.train.torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
