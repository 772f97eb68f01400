"""The LLM trainer and Ray Tune searches as Ray jobs on the real local platform."""

from __future__ import annotations

import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

from ray_apps.ray_client import job_client
from ray_apps.training import follow, submit_search, submit_training

pytestmark = pytest.mark.slow
SMALL_LLM = {"model": "tiny", "dataset": "pydoc", "block_size": 64, "batch_size": 8, "max_steps": 20,
             "eval_every": 10, "eval_batches": 8, "warmup_steps": 5}
SMALL_MNIST = ["--epochs", "2", "--train-samples", "1000", "--test-samples", "300"]


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


def follow_then_stop(platform, submission_id: str):
    """Follow a search to its end; one still running when the wait ends is stopped, so that it does not
    hold the CPUs the next test needs."""
    try:
        return follow(platform, submission_id, on_progress=lambda line: None, poll_s=1.0, timeout_s=600)
    finally:
        client = job_client(platform.dashboard_url)
        if client.get_job_status(submission_id).value in ("PENDING", "RUNNING"):
            client.stop_job(submission_id)


def test_tune_search_of_four_trials_with_parent_and_child_runs(platform):
    sub = submit_search(platform, ["mnist", *SMALL_MNIST, "--cpus-per-worker", "1", "--num-samples", "4",
                                   "--max-concurrent", "2", "--search-seed", "1"])
    outcome = follow_then_stop(platform, sub.submission_id)
    assert outcome.ok, "\n".join(outcome.log_tail)
    result = outcome.result
    assert result["trials"] == 4 and not result["stopped_by_budget"] and result["spent_usd"] > 0
    best = result["best"]
    client = MlflowClient(platform.tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["oppen.tune"] == "true"
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best["test_accuracy"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = {c.data.tags["oppen.tune.trial"]: c.info.status for c in children}
    assert len(children) == 4 and set(statuses.values()) <= {"FINISHED", "KILLED"}, (statuses, result["trials"])
    accs = [c.data.metrics.get("test_accuracy") for c in children]
    assert best["test_accuracy"] == pytest.approx(max(a for a in accs if a is not None))
    assert len({c.data.params["lr"] for c in children}) == 4  # four different draws


def test_a_tiny_budget_stops_launching_trials_and_says_so(platform):
    sub = submit_search(platform, ["mnist", *SMALL_MNIST, "--num-samples", "4", "--max-concurrent", "1",
                                   "--budget-usd", "0.00001", "--no-tracking"])
    outcome = follow_then_stop(platform, sub.submission_id)
    assert outcome.ok, "\n".join(outcome.log_tail)
    result = outcome.result
    assert result["stopped_by_budget"] and result["trials"] == 1 and result["not_started"] == 3
    assert result["spent_usd"] >= 0.00001
    assert any("budget reached" in line and "3 drawn trial(s) were not launched" in line for line in outcome.log_tail)
