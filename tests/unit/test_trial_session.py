"""Where a trial trains: one worker in Tune's own (reused) trial process, several as a Ray Train run."""
import torch

from trainers.session import IN_TRIAL, current
from trainers.specs import build_config
from trainers.tune import in_trial_process, trial_resources


def test_a_one_worker_trial_holds_its_workers_share_and_a_gang_trial_only_a_token():
    one = build_config("mnist", {"cpus_per_worker": 2})
    gpu = build_config("mnist", {"cpus_per_worker": 1, "gpus_per_worker": 1})
    gang = build_config("mnist", {"num_workers": 2, "cpus_per_worker": 1})
    assert in_trial_process(one) and in_trial_process(gpu) and not in_trial_process(gang)
    assert trial_resources(one) == {"CPU": 2}
    assert trial_resources(gpu) == {"CPU": 1, "GPU": 1}
    assert trial_resources(gang) == {"memory": 1 << 20}  # its Ray Train workers hold the CPUs


def test_the_trial_process_session_is_rank_0_of_1_and_computes_where_cuda_is():
    session = current({IN_TRIAL: True})
    assert (session.rank, session.world, session.in_trial) == (0, 1, True)
    device = session.device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = session.prepare_model(torch.nn.Linear(2, 1), device)
    assert isinstance(model, torch.nn.Linear)  # no DDP wrapper for one rank
    assert next(model.parameters()).device.type == device.type
