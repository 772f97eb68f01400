"""Where a trainer's `train_func` runs, and what it asks of that place.

Most runs are Ray Train worker groups: a job's, or a multi-worker Tune trial's. A one-worker Tune
trial instead runs `train_func` in the trial's own process (trainers.tune): no controller and worker
group to start per trial, and Tune hands that warm process to the next trial (`reuse_actors`).
`train_func` asks this module for its rank, device, checkpoint and reports, so the step code is the
same in both places.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IN_TRIAL = "in_trial_process"  # loop-config key: True when train_func runs inside a Tune trial itself


@dataclass(frozen=True)
class Session:
    rank: int
    world: int
    in_trial: bool

    def device(self):
        """The torch device to compute on: the CPU where the GPUs are logical (a CPU-only box)."""
        from trainers.runtime import worker_device

        return worker_device(self.in_trial)

    def prepare_model(self, model, device):
        """On the device; wrapped in DDP where there are several ranks (Ray's `prepare_model`, which at
        one rank on the CPU only moves the model: done here without importing `ray.train.torch`)."""
        if self.in_trial or (self.world == 1 and device.type == "cpu"):
            return model.to(device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=device)

    def checkpoint(self):
        """The checkpoint to go on from (a restarted worker group or trial), or None."""
        if self.in_trial:
            from ray import tune

            return tune.get_checkpoint()
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        """Report `metrics`, with the checkpoint saved in `directory` (rank 0's) when given."""
        if self.in_trial:
            from ray import tune

            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)
            return
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


def current(cfg: dict) -> Session:
    """This run's session, from its loop config."""
    if cfg.get(IN_TRIAL):
        return Session(rank=0, world=1, in_trial=True)
    import ray.train

    ctx = ray.train.get_context()
    return Session(rank=ctx.get_world_rank(), world=ctx.get_world_size(), in_trial=False)
