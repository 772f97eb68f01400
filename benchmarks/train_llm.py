"""The LLM trainer, measured against its anchor in one run.

    .venv/bin/python benchmarks/train_llm.py            # ~15 minutes on 2 cores
    .venv/bin/python benchmarks/train_llm.py --quick    # the tiny model, ~4 minutes

1. Steady-state tokens/s of the Ray Train job (1 worker x 2 CPUs, through the
   platform) against the same model and step code (`trainers.llm_model`) in a
   plain PyTorch loop with 2 threads, run before and after it. Tokens/s are
   tokens over summed step time in both, windows after the first.
2. The perplexity the default offline run (DistilGPT2's architecture from scratch
   on the offline corpus) reaches after a fixed number of steps.

Results go to stdout and to benchmarks/results/train_llm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from ray_apps import cluster  # noqa: E402
from ray_apps.config import load_settings  # noqa: E402
from ray_apps.training import follow, submit_training  # noqa: E402
from trainers.llm_model import batch_order, build_model, make_optimizer, to_blocks, train_step  # noqa: E402
from trainers.specs import LlmConfig  # noqa: E402
from trainers.text_data import load_tokens  # noqa: E402
from trainers.tokenizer import load_gpt2_tokenizer  # noqa: E402

BENCH = {"ray": {"gcs_port": 6879, "dashboard_port": 8765, "metrics_export_port": 8580, "dashboard_agent_port": 52865},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5500}, "serve_port": 8500,
         "metrics_port": 9485, "serve_proxy": {"stats_port": 8574, "metrics_port": 9175, "fallback_port": 8575},
         "prometheus": {"enabled": False}}


def start_platform(tmp: Path):
    (tmp / "data").mkdir()
    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH}))
    settings = load_settings(cfg)
    cluster.up(settings, timeout=180, serve=False, say=lambda s: None)
    cluster.use_ray_token()
    return settings


def plain_loop(spec: LlmConfig, data_dir: Path, steps: int, skip: int = 3) -> float:
    """Tokens/s of the same step code in one process, after `skip` warm-up steps."""
    torch.set_num_threads(int(spec.cpus_per_worker))
    torch.manual_seed(spec.seed)
    tok, source = load_gpt2_tokenizer(data_dir, offline=True)
    blocks = to_blocks(load_tokens(data_dir, spec.dataset, tok, source, offline=True).train, spec.block_size,
                       spec.max_train_tokens)
    model, _ = build_model(spec.model, len(tok), offline=True)
    opt, sched = make_optimizer(model, lr=spec.learning_rate("scratch:"), weight_decay=spec.weight_decay,
                                warmup_steps=spec.warmup_steps, total_steps=steps)
    order = batch_order(len(blocks), 0, spec.seed)
    tokens = seconds = 0.0
    for step in range(steps):
        chunk = order[step * spec.batch_size:(step + 1) * spec.batch_size]
        stats = train_step(model, opt, sched, [blocks[chunk]], device=torch.device("cpu"),
                           amp=torch.autocast("cpu", enabled=False), scaler=None)
        if step >= skip:
            tokens += stats.tokens
            seconds += stats.seconds
    return tokens / seconds


def ray_job(settings, params: dict) -> tuple[dict, list[float], dict]:
    from mlflow.tracking import MlflowClient

    sub = submit_training(settings, "llm", params)
    outcome = follow(settings, sub.submission_id, on_progress=lambda line: print("   ", line, flush=True))
    if not outcome.ok:
        sys.exit("job failed:\n" + "\n".join(outcome.log_tail))
    client = MlflowClient(settings.tracking_uri)
    rates = [m.value for m in sorted(client.get_metric_history(sub.mlflow_run_id, "tokens_per_s"),
                                     key=lambda m: m.step)]
    ppl = {m.step: m.value for m in client.get_metric_history(sub.mlflow_run_id, "perplexity")}
    return outcome.result, rates, {"perplexity_by_step": ppl, "params": client.get_run(sub.mlflow_run_id).data.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model on the stdlib corpus")
    args = parser.parse_args()
    if args.quick:
        params = {"model": "tiny", "dataset": "pydoc", "block_size": 128, "max_steps": 60, "eval_every": 15}
    else:  # the default run: distilgpt2's architecture on WikiText-2, or its offline stand-in
        params = {"max_steps": 60, "eval_every": 15}
    spec = LlmConfig(**params)
    out: dict = {"params": params}
    with tempfile.TemporaryDirectory(prefix="oppen-llm-bench-") as tmp:
        settings = start_platform(Path(tmp))
        try:
            tok, source = load_gpt2_tokenizer(settings.data_dir)
            load_tokens(settings.data_dir, spec.dataset, tok, source)  # tokenized once, shared by both sides
            plain_steps = 12 if not args.quick else 40
            print(f"plain loop, {plain_steps} steps", flush=True)
            plain = plain_loop(spec, settings.data_dir, plain_steps)
            print(f"  {plain:.0f} tokens/s", flush=True)
            t0 = time.monotonic()
            result, rates, info = ray_job(settings, params)
            wall = time.monotonic() - t0
            plain_after = plain_loop(spec, settings.data_dir, plain_steps)
            anchor = statistics.mean([plain, plain_after])
            ray_steady = statistics.median(rates[1:] if len(rates) > 1 else rates)
            out.update({"plain_tokens_per_s": [plain, plain_after], "ray_tokens_per_s_windows": rates,
                        "ray_steady_tokens_per_s": ray_steady, "ratio": ray_steady / anchor,
                        "perplexity_by_step": info["perplexity_by_step"], "wall_s": wall,
                        "model_source": info["params"].get("model_source"),
                        "data_source": info["params"].get("data_source"), "result": result})
            print(f"Ray Train {ray_steady:.0f} tokens/s vs plain {plain:.0f} / {plain_after:.0f}: "
                  f"{ray_steady / anchor:.2f}x", flush=True)
            print(f"perplexity after {params['max_steps']} steps: {result.get('perplexity'):.1f} "
                  f"({info['params'].get('model_source')}, {info['params'].get('data_source')}); "
                  f"submit to done {wall:.0f} s", flush=True)
        finally:
            cluster.down(settings)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "train_llm.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
