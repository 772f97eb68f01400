"""The LLM trainer as a Ray job, and Ray Tune searches as jobs of the queue, on the real local platform."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from ray_apps.agent.tools import PlatformTools
from ray_apps.processes import wait_until
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import ACTIVE, JobState
from ray_apps.training import follow, follow_queued, submit_training
from tests.integration.conftest import QUEUE_CONFIG

pytestmark = pytest.mark.slow
SMALL_LLM = {"model": "tiny", "dataset": "pydoc", "block_size": 64, "batch_size": 8, "max_steps": 20,
             "eval_every": 10, "eval_batches": 8, "warmup_steps": 5}
SMALL_MNIST = {"epochs": 2, "train_samples": 1000, "test_samples": 300}


@pytest.fixture(scope="module")
def tokenizer_cached(platform, mnist_cache):
    """The offline tokenizer files the unit tests rebuilt, copied into the platform's data dir."""
    src = mnist_cache / "tokenizers"
    if src.exists():
        shutil.copytree(src, platform.data_dir / "tokenizers", dirs_exist_ok=True)


def test_small_llm_job_lowers_the_loss_logs_perplexity_and_a_loadable_model(platform, tokenizer_cached, tmp_path):
    sub = submit_training(platform, "llm", SMALL_LLM, metadata={"tenant": "team-a"})
    outcome = follow(platform, sub.submission_id, on_progress=lambda line: None, poll_s=1.0, timeout_s=600)
    assert outcome.ok, "\n".join(outcome.log_tail)
    client = MlflowClient(platform.tracking_uri)
    run = client.get_run(sub.mlflow_run_id)
    params = run.data.params
    assert params["tokenizer_source"] in ("hf:distilgpt2", "pypi:openai-whisper==20250625")
    assert params["data_source"].startswith("stdlib-docstrings:") and params["model_source"].startswith("scratch:tiny")
    assert params["total_steps"] == "20" and run.data.tags["oppen.trained_from_scratch"] == "true"
    loss = {m.step: m.value for m in client.get_metric_history(sub.mlflow_run_id, "eval_loss")}
    ppl = {m.step: m.value for m in client.get_metric_history(sub.mlflow_run_id, "perplexity")}
    assert sorted(loss) == [10, 20] and loss[20] < loss[10] - 0.5
    assert ppl[20] == pytest.approx(torch.tensor(loss[20]).exp().item(), rel=1e-6)
    assert {m.key for m in client.get_metric_history(sub.mlflow_run_id, "tokens_per_s")} == {"tokens_per_s"}
    assert outcome.result["perplexity"] == pytest.approx(ppl[20])

    # The logged folder loads back with from_pretrained and generates text.
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(platform.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(run_id=sub.mlflow_run_id, artifact_path="model", dst_path=str(tmp_path))
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = tok("Return the", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8 and len(tok.decode(out[0])) > len("Return the")


def test_an_llm_job_tokenized_by_ray_data_trains_as_well_and_logs_the_same_input(platform, tokenizer_cached):
    """`--data-pipeline ray-data`: the corpus tokenized by a Ray Data stage, the blocks streamed to the
    worker; the same bar on the loss as the in-memory run above, and the same dataset input."""
    sub = submit_training(platform, "llm", {**SMALL_LLM, "data_pipeline": "ray-data"}, metadata={"tenant": "team-a"})
    lines: list[str] = []
    outcome = follow(platform, sub.submission_id, on_progress=lines.append, poll_s=1.0, timeout_s=600)
    assert outcome.ok, "\n".join(outcome.log_tail)
    assert any("ray-data pipeline: corpus pydoc tokenized in" in line for line in lines), lines
    assert any("pipeline=ray-data" in line for line in lines)
    assert any("tokenizer on node group" in line for line in lines)
    client = MlflowClient(platform.tracking_uri)
    run = client.get_run(sub.mlflow_run_id)
    assert run.data.params["data_pipeline"] == "ray-data" and run.data.params["total_steps"] == "20"
    assert run.data.params["data_source"].startswith("stdlib-docstrings:")
    loss = {m.step: m.value for m in client.get_metric_history(sub.mlflow_run_id, "eval_loss")}
    assert sorted(loss) == [10, 20] and loss[20] < loss[10] - 0.5
    [given] = run.inputs.dataset_inputs
    assert given.dataset.name == "pydoc"


@pytest.fixture()
def queue(platform):
    return Queue.from_settings(platform, QueueConfig(**QUEUE_CONFIG))


def follow_then_cancel(queue, job_id: str):
    """Follow a queued search to its end; one still waiting or running when the wait ends is cancelled
    (which stops it in Ray), so that it does not hold the CPUs the next test needs."""
    try:
        return follow_queued(queue, job_id, on_progress=lambda line: None, poll_s=1.0, timeout_s=600)
    finally:
        if not queue.get(job_id).state.is_terminal():
            queue.cancel(job_id)


def wait_metered(queue, job_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while job_id not in queue.store.costs([job_id]):
        assert time.monotonic() < deadline, f"{job_id} not metered after {timeout} s"
        time.sleep(0.5)
    return queue.store.costs([job_id])[job_id]


def test_tune_search_of_four_trials_with_parent_and_child_runs(platform, queue):
    job = queue.submit("mnist", {**SMALL_MNIST, "cpus_per_worker": 1}, tenant="team-a",
                       search={"num_samples": 4, "max_concurrent": 2, "search_seed": 1})
    assert (job.workers, job.cpus_per_worker, job.search["max_concurrent"]) == (2, 1.0, 2)  # two trials' gangs
    outcome = follow_then_cancel(queue, job.id)
    assert outcome.ok, "\n".join(outcome.log_tail)
    result = outcome.result
    assert result["trials"] == 4 and not result["stopped_by_budget"] and result["spent_usd"] > 0
    best = result["best"]
    # The queue's record names the search's parent run: the one the dispatcher opened.
    job = queue.get(job.id)
    assert job.state is JobState.SUCCEEDED and result["mlflow_run_id"] == job.mlflow_run_id
    client = MlflowClient(platform.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["oppen.tune"] == "true" and parent.data.tags["oppen.tenant"] == "team-a"
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best["test_accuracy"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = {c.data.tags["oppen.tune.trial"]: c.info.status for c in children}
    assert len(children) == 4 and set(statuses.values()) <= {"FINISHED", "KILLED"}, (statuses, result["trials"])
    accs = [c.data.metrics.get("test_accuracy") for c in children]
    assert best["test_accuracy"] == pytest.approx(max(a for a in accs if a is not None))
    assert len({c.data.params["lr"] for c in children}) == 4  # four different draws
    # One-worker trials train in Tune's trial processes, which later trials reuse (2 at a time here).
    assert 1 <= result["trial_processes"] < 4, result
    # Metered like any job: the reserved gang (2 CPUs) for Ray's run time, also on the parent run.
    cost = wait_metered(queue, job.id)
    assert cost.seconds > 0 and cost.cpu_usd > 0
    assert wait_until(lambda: "job_cost_usd" in client.get_run(job.mlflow_run_id).data.metrics, timeout=60)
    assert client.get_run(job.mlflow_run_id).data.tags["oppen.cost.allocation"].startswith("cpus=2 ")


def test_a_trial_whose_process_dies_goes_on_from_its_last_checkpoint_in_the_same_run(platform, queue):
    """A one-worker trial trains in Tune's trial process: SIGKILLed after an epoch, Tune restarts it from
    that epoch's checkpoint (as Ray Train restarts a worker group), logging on into the trial's run."""
    import psutil

    job = queue.submit("mnist", {"epochs": 4, "train_samples": 6000, "test_samples": 300, "cpus_per_worker": 1},
                       search={"num_samples": 1, "max_concurrent": 1, "search_seed": 3})
    client = MlflowClient(platform.tracking_uri)

    def children():
        parent = queue.get(job.id).mlflow_run_id
        return client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'") if parent else []

    try:
        assert wait_until(lambda: any(c.data.metrics.get("epoch", 0) >= 1 for c in children()), timeout=300)
        time.sleep(1.0)  # the epoch's checkpoint is reported right after its metrics are sent
        trials = [p for p in psutil.process_iter(["cmdline"]) if "ImplicitFunc" in " ".join(p.info["cmdline"] or [])]
        assert len(trials) == 1, [p.info["cmdline"] for p in trials]
        trials[0].kill()
        outcome = follow_then_cancel(queue, job.id)
    finally:
        if not queue.get(job.id).state.is_terminal():
            queue.cancel(job.id)
    assert outcome.ok, "\n".join(outcome.log_tail)
    [run] = children()  # the restarted trial logged on into its first run
    assert int(run.data.tags["oppen.resumed_from_epoch"]) >= 1
    assert run.data.metrics["epoch"] == 4 and run.info.status == "FINISHED"
    assert outcome.result["best"]["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])


def test_a_tiny_budget_stops_launching_trials_and_says_so(queue):
    job = queue.submit("mnist", SMALL_MNIST, search={"num_samples": 4, "max_concurrent": 1, "budget_usd": 0.00001})
    outcome = follow_then_cancel(queue, job.id)
    assert outcome.ok, "\n".join(outcome.log_tail)
    result = outcome.result
    assert result["stopped_by_budget"] and result["trials"] == 1 and result["not_started"] == 3
    assert result["spent_usd"] >= 0.00001
    assert any("budget reached" in line and "3 drawn trial(s) were not launched" in line for line in outcome.log_tail)


def test_an_agent_started_search_is_queued_counts_against_the_quota_and_its_cancel_stops_it(platform, queue):
    """team-s may hold 1 CPU: while its search (1 trial x 1 worker x 1 CPU) runs, its next 1-CPU job
    waits although a CPU is free; cancelling the search through the agent stops it in Ray."""
    for open_job in queue.list(tenant="team-s", states=[JobState.QUEUED, *ACTIVE]):
        queue.cancel(open_job.id)
    agent = PlatformTools(platform, queue=queue).for_caller("team-s", admin=False, request_key=f"s-{time.time_ns()}")
    started = agent.call("start_hyperparameter_search", {
        "trainer": "mnist", "num_samples": 4, "params": {"epochs": 3, "train_samples": 1000, "test_samples": 300,
                                                         "cpus_per_worker": 1}})
    job_id = started["id"]
    assert started["tenant"] == "team-s" and started["search"]["num_samples"] == 4
    assert [j.id for j in queue.list(tenant="team-s")] == [job_id]  # in the queue, as the caller's tenant
    second = None
    try:
        assert wait_until(lambda: queue.get(job_id).state is JobState.RUNNING, timeout=120), queue.get(job_id)
        second = queue.submit("probe", {"seconds": 1, "cpus_per_worker": 1}, tenant="team-s").id
        time.sleep(5)  # many dispatcher cycles (0.3 s each)
        assert queue.get(second).state is JobState.QUEUED, queue.get(second)
        assert queue.get(job_id).state is JobState.RUNNING
        assert queue.capacity().resources.free("CPU") >= 1  # room in the cluster: the quota holds it back

        cancelled = agent.call("cancel_job", {"job_id": job_id})
        assert cancelled == {"cancelled": [job_id], "refused": []}
        search = queue.get(job_id)
        ray_jobs = queue.ray_client()
        assert wait_until(lambda: ray_jobs.get_job_status(search.ray_submission_id).is_terminal(), timeout=60), \
            "Ray never stopped the cancelled search"
        assert ray_jobs.get_job_status(search.ray_submission_id).value == "STOPPED"
        # With the search gone, the quota lets the waiting job run.
        assert wait_until(lambda: queue.get(second).state is JobState.SUCCEEDED, timeout=120), queue.get(second)
        assert queue.get(job_id).state is JobState.CANCELLED
        assert wait_metered(queue, job_id).seconds > 0  # what it ran is charged
    finally:
        for open_id in (job_id, second):
            if open_id and not queue.get(open_id).state.is_terminal():
                queue.cancel(open_id)
