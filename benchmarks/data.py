"""Data ingest: MNIST trained from a Ray Data pipeline against the in-memory path, in one run.

    .venv/bin/python benchmarks/data.py            # ~15 minutes on 2 cores, ~4.5 GB of scratch disk
    .venv/bin/python benchmarks/data.py --quick    # smaller: a smoke run of every part (~4 minutes)
    .venv/bin/python benchmarks/data.py --part streaming --workdir /tmp/bench-data   # one part; keeps the data

Everything runs on a local Ray of the benchmark's own (2 CPUs, token auth off, stopped at the end);
the trainers are the real `python -m trainers.mnist` and `trainers.llm` jobs (`--no-tracking`), connected to it.

1. Throughput, same step code (`trainers.mnist_model.train_batches`): `--data-pipeline ray-data`
   (Ray Data decodes and streams the images to the worker) against `memory` (the worker
   holds the decoded tensors), 1 worker x 2 CPUs, interleaved rounds on the real MNIST. Ratio =
   ray-data samples/s / memory samples/s, from the epochs after the first. Goal: >= 0.9x.
2. Data wait: the share of the ray-data epochs' step time spent waiting for the next batch (the
   trainer measures it around `next()`; the `data_wait=` of its epoch lines).
   LLM: the tiny GPT-2 on Shakespeare, `--data-pipeline ray-data` (Ray Data tokenizes, the blocks
   stream to the worker) against `memory` (the driver's cached token ids), same step code, tokens/s
   of the evaluation windows after the first. Goal: >= 0.9x.
3. Ingest alone: rows/s of a rank's shard, read as torch batches with no training: the built-in's
   pixels, 28x28 PNG files (a folder of one's own), and the large synthetic set; and the LLM's
   tokenizing by Ray Data (Shakespeare, tokens/s with the tokenizer actors' start).
4. Streaming: a synthetic Parquet set of 512x512 noise PNGs, 4x the per-process memory limit
   (1 GiB) in bytes, trains one epoch with `--data-pipeline ray-data`; every process of the run
   (the job's driver, the Ray Train worker, the Ray Data task workers) is sampled for its peak RSS.
   Ray does not enforce a worker's memory reservation, so the limit is checked on what was measured.
   Goal: every process stays under the limit.

Results go to stdout and to benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

GIB = 2**30
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) .*samples/s=(\d+) data_wait=([\d.]+)%")
LLM_LINE = re.compile(r"step (\d+)/(\d+) .*tokens/s=(\d+)")
TOKENIZED_LINE = re.compile(r"tokenized in ([\d.]+) s")
TEST_CACHE = ROOT / ".oppen" / "test-cache"


# --------------------------------------------------------------------------- set-up


def data_dir_with_mnist(workdir: Path) -> Path:
    from trainers.data import load_mnist

    cache = Path(os.environ.get("OPPEN_TEST_CACHE") or TEST_CACHE)
    load_mnist(cache)  # fetched once per machine
    data = workdir / "data"
    (data / "datasets").mkdir(parents=True, exist_ok=True)
    for name in ("mnist.npz", "mnist.json"):
        shutil.copy(cache / "datasets" / name, data / "datasets" / name)
    return data


def png_folder(root: Path, data_dir: Path, n: int) -> Path:
    """The first n MNIST training images as 28x28 PNG files, <label>/<i>.png."""
    from PIL import Image

    from trainers.data import load_mnist

    a = load_mnist(data_dir)
    for i in range(n):
        folder = root / str(int(a.train_labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.train_images[i], "L").save(folder / f"{i}.png")
    return root


def synthetic_parquet(root: Path, total_bytes: int, side: int = 512, per_file: int = 1024) -> tuple[Path, int]:
    """Noise PNGs of side x side (incompressible: bytes on disk ~ pixels) with random labels, in
    Parquet files of `per_file` rows and row groups of 32, until `total_bytes` are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    done = root.with_name(root.name + ".done.json")  # a --workdir kept from an earlier run: reuse it
    if done.exists() and json.loads(done.read_text())["asked"] == total_bytes:
        return root, json.loads(done.read_text())["rows"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written, rows, index = 0, 0, 0
    while written < total_bytes:
        images, labels = [], []
        for _ in range(per_file):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L").save(buf, format="PNG",
                                                                                          compress_level=1)
            images.append(buf.getvalue())
            labels.append(int(rng.integers(0, 10)))
        path = root / f"part-{index:04d}.parquet"
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path, row_group_size=32)
        written += path.stat().st_size
        rows += per_file
        index += 1
    done.write_text(json.dumps({"asked": total_bytes, "rows": rows}))
    return root, rows


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


# --------------------------------------------------------------------------- runs


class RssSampler:
    """Peak RSS per process of a run: the job's driver (by pid), Ray Train workers, Ray Data task workers."""

    def __init__(self, driver_pid: int):
        self.driver_pid, self.peaks, self._stop = driver_pid, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    rss = proc.info["memory_info"].rss
                except (psutil.Error, AttributeError):
                    continue
                role = ("driver" if proc.info["pid"] == self.driver_pid else
                        "train_worker" if "RayTrainWorker" in cmd else
                        "data_task" if cmd.startswith("ray::") and ("MapBatches" in cmd or "ReadRange" in cmd
                                                                    or "ray::IDLE" in cmd or "_decode" in cmd)
                        else None)
                if role:
                    key = (role, proc.info["pid"])
                    self.peaks[key] = max(self.peaks.get(key, 0), rss)
            time.sleep(0.25)

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (role, _), rss in self.peaks.items():
            out[role] = max(out.get(role, 0.0), rss / GIB)
        return out


def llm_run(env: dict, data_dir: Path, args: list[str]) -> dict:
    """One `python -m trainers.llm` job on the benchmark's Ray: tokens/s of its evaluation windows after
    the first (the first holds the start), and the driver's tokenizing time where Ray Data tokenized."""
    cmd = [sys.executable, "-m", "trainers.llm", "--no-tracking", "--data-dir", str(data_dir),
           "--num-workers", "1", "--cpus-per-worker", "2", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    windows = [float(m.group(3)) for m in LLM_LINE.finditer(proc.stdout)]
    tokenized = TOKENIZED_LINE.search(proc.stdout)
    if proc.returncode != 0 or len(windows) < 2:
        raise SystemExit(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n" + proc.stdout[-3000:])
    return {"wall_s": round(time.monotonic() - t0, 1), "tokens_per_s": statistics.median(windows[1:]),
            "windows": windows, **({"tokenize_s": float(tokenized.group(1))} if tokenized else {})}


def trainer_run(env: dict, data_dir: Path, args: list[str], *, sample_rss: bool = False) -> dict:
    """One `python -m trainers.mnist` job on the benchmark's Ray: its epochs' samples/s and data wait."""
    cmd = [sys.executable, "-m", "trainers.mnist", "--no-tracking", "--data-dir", str(data_dir),
           "--num-workers", "1", "--cpus-per-worker", "2", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(proc.pid) if sample_rss else None
    if sampler:
        sampler.__enter__()
    epochs: dict[int, tuple[float, float]] = {}
    result = None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = EPOCH_LINE.search(line)
        if m:
            epochs[int(m.group(1))] = (float(m.group(3)), float(m.group(4)) / 100)
        if "OPPEN_RESULT" in line:
            result = json.loads(line[line.index("OPPEN_RESULT") + len("OPPEN_RESULT"):])
    proc.wait()
    if sampler:
        sampler.__exit__()
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(lines[-30:]))
    steady = [epochs[e] for e in sorted(epochs) if e > 1] or [epochs[e] for e in sorted(epochs)]
    return {"wall_s": round(time.monotonic() - t0, 1),
            "samples_per_s": statistics.median(s for s, _ in steady),
            "data_wait": statistics.median(w for _, w in steady),
            "epochs": {e: {"samples_per_s": s, "data_wait": w} for e, (s, w) in sorted(epochs.items())},
            "test_accuracy": result["test_accuracy"],
            **({"peak_rss_gib": sampler.by_role()} if sampler else {})}


def ingest_rate(spec_kwargs: dict, data_dir: Path, info: dict | None, train_samples: int | None) -> dict:
    """A rank's shard read as torch batches with nothing else running: rows/s of the first epoch (with
    the decoder actor's start) and of the second."""
    from trainers.ray_pipeline import EpochStream, mnist_plan
    from trainers.specs import MnistConfig

    spec = MnistConfig(num_workers=1, cpus_per_worker=2, epochs=2, **spec_kwargs)
    plan = mnist_plan(spec, data_dir, info, train_samples=train_samples)
    [shard] = [d["train"] for d in plan.data_config.configure({"train": plan.dataset}, world_size=1,
                                                                worker_handles=None, worker_node_ids=None)]
    stream = EpochStream(shard, batch_size=spec.batch_size, steps=plan.steps_per_epoch, first_epoch=0)
    passes = []
    for epoch in range(2):
        t0, rows = time.perf_counter(), 0
        for _, y in stream.epoch(epoch):
            rows += len(y)
        passes.append(rows / (time.perf_counter() - t0))
    stream.close()
    return {"rows": rows, "rows_per_s_cold": round(passes[0]), "rows_per_s": round(passes[1])}


def text_ingest_rate(data_dir: Path) -> dict:
    """The LLM's Ray Data tokenizing alone (trainers.text_pipeline.text_plan) on Shakespeare: tokens/s
    from the plan's start to its last block in the object store, tokenizer actors' start included."""
    from trainers.data import hub_reachable
    from trainers.specs import LlmConfig
    from trainers.text_data import load_corpus
    from trainers.text_pipeline import text_plan

    offline = not hub_reachable()
    corpus = load_corpus(data_dir, "shakespeare", offline=offline)
    spec = LlmConfig(num_workers=1, cpus_per_worker=2, model="tiny", dataset="shakespeare", max_steps=10)
    t0 = time.perf_counter()
    plan = text_plan(spec, corpus.train, corpus.validation, data_dir=data_dir, offline=offline)
    seconds = time.perf_counter() - t0
    tokens = plan.train_tokens + plan.validation_tokens
    return {"tokens": tokens, "chars": len(corpus.train) + len(corpus.validation), "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "rows": sum(plan.plan.rows_per_rank),
            "rows_per_s": round(sum(plan.plan.rows_per_rank) / seconds)}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs of every part")
    parser.add_argument("--part", choices=("all", "throughput", "llm", "ingest", "streaming"), default="all",
                        help="run one part; its figures replace that part's in the results file (throughput: "
                             "its rounds are added to those of the same size)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default: 2, quick: 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder, kept for the next run (default: a temporary one, removed)")
    args = parser.parse_args()
    quick = args.quick
    n, epochs, rounds = (6000, 2, 1) if quick else (20000, 3, 2)
    rounds = args.rounds or rounds
    limit_gib = 1.0
    synth_gib = 0.25 if quick else 4 * limit_gib
    parts = ("throughput", "llm", "ingest", "streaming") if args.part == "all" else (args.part,)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oppen-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: its drivers need no token
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    results = ROOT / "benchmarks" / "results" / "data.json"
    out: dict = json.loads(results.read_text()) if args.part != "all" and results.exists() else {}
    out.update({"quick": quick, "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB"})
    try:
        data_dir = data_dir_with_mnist(workdir)
        pngs = workdir / "pngs"
        if not pngs.exists():
            png_folder(pngs, data_dir, 2000 if quick else 6000)
        t0 = time.monotonic()
        synth, synth_rows = synthetic_parquet(workdir / "synth", int(synth_gib * GIB))
        synth_bytes = folder_bytes(synth)
        print(f"synthetic set: {synth_rows} rows, {synth_bytes / GIB:.2f} GiB ({time.monotonic() - t0:.0f} s)",
              flush=True)
        catalog = workdir / "datasets.yaml"
        catalog.write_text(yaml.safe_dump({"datasets": {
            "mnist": {"kind": "images", "source": "builtin:mnist", "description": "MNIST"},
            "shakespeare": {"kind": "text", "source": "builtin:shakespeare", "description": "Shakespeare"},
            "pngs": {"kind": "images", "source": str(pngs), "description": "MNIST as PNG files"},
            "synth": {"kind": "images", "source": str(synth), "format": "parquet",
                      "description": "512x512 noise PNGs in Parquet", "test_fraction": 0.02}}}))
        os.environ["OPPEN_DATASETS_FILE"] = str(catalog)

        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        env = {**os.environ, "RAY_ADDRESS": ctx.address_info["gcs_address"], "PYTHONPATH": str(ROOT)}

        from trainers import ingest
        from trainers.dataset_catalog import load_catalog
        from trainers.specs import MnistConfig

        if "throughput" in parts:  # 1-2. Throughput and data wait, interleaved.
            print(f"throughput: {n} MNIST images x {epochs} epochs, {rounds} round(s) each way", flush=True)
            runs = {"memory": [], "ray-data": []}
            before = out.get("throughput", {})
            if args.part == "throughput" and (before.get("samples"), before.get("epochs")) == (n, epochs):
                runs = before["runs"]  # another round of the same runs: the rounds add up
            for r in range(rounds):
                for mode in ("memory", "ray-data"):
                    got = trainer_run(env, data_dir, ["--train-samples", str(n), "--test-samples", "2000",
                                                      "--epochs", str(epochs), "--data-pipeline", mode])
                    runs[mode].append(got)
                    print(f"  round {len(runs[mode])} {mode:8}: {got['samples_per_s']:.0f} samples/s, data wait "
                          f"{got['data_wait']:.1%}, test accuracy {got['test_accuracy']:.4f}, {got['wall_s']} s",
                          flush=True)
            ratios = [rd["samples_per_s"] / mem["samples_per_s"] for mem, rd in zip(runs["memory"], runs["ray-data"])]
            out["throughput"] = {"samples": n, "epochs": epochs, "runs": runs, "ratios": [round(x, 3) for x in ratios],
                                 "ratio_median": round(statistics.median(ratios), 3),
                                 "data_wait_ray_data": round(statistics.median(r["data_wait"]
                                                                               for r in runs["ray-data"]), 4)}

        if "llm" in parts:  # 2b. The LLM trainer: tokenized by Ray Data vs the driver's cached ids.
            steps, eval_every = (60, 20) if quick else (150, 30)
            print(f"llm: tiny GPT-2 on Shakespeare, {steps} steps, {rounds} round(s) each way", flush=True)
            runs = {"memory": [], "ray-data": []}
            for r in range(rounds):
                for mode in ("memory", "ray-data"):
                    got = llm_run(env, data_dir, ["--model", "tiny", "--dataset", "shakespeare", "--max-steps",
                                                  str(steps), "--eval-every", str(eval_every), "--eval-batches", "2",
                                                  "--data-pipeline", mode])
                    runs[mode].append(got)
                    print(f"  round {r + 1} {mode:8}: {got['tokens_per_s']:.0f} tokens/s"
                          + (f", tokenized by Ray Data in {got['tokenize_s']} s" if "tokenize_s" in got else "")
                          + f", {got['wall_s']} s", flush=True)
            ratios = [rd["tokens_per_s"] / mem["tokens_per_s"] for mem, rd in zip(runs["memory"], runs["ray-data"])]
            out["llm"] = {"steps": steps, "runs": runs, "ratios": [round(x, 3) for x in ratios],
                          "ratio_median": round(statistics.median(ratios), 3)}

        if "ingest" in parts or "streaming" in parts:  # checks every row once; cached by content hash
            t0 = time.monotonic()
            infos = {name: ingest.prepare(MnistConfig(dataset=name, data_pipeline="ray-data"), data_dir)
                     for name in ("pngs", "synth")}
            print(f"datasets hashed and checked ({time.monotonic() - t0:.0f} s)", flush=True)

        if "ingest" in parts:  # 3. Ingest alone.
            print("ingest alone (a rank's shard as torch batches, no training)", flush=True)
            out["ingest"] = {"builtin_pixels": ingest_rate({}, data_dir, None, None)}
            for name in ("pngs", "synth"):
                out["ingest"][name] = ingest_rate({"dataset": name}, data_dir, infos[name], None)
            out["ingest"]["synth"]["mb_per_s"] = round(out["ingest"]["synth"]["rows_per_s"] * synth_bytes
                                                       / synth_rows / 1e6, 1)
            for name, got in out["ingest"].items():
                print(f"  {name:15} {got['rows_per_s']:>7,} rows/s ({got['rows_per_s_cold']:,} cold) over "
                      f"{got['rows']:,} rows", flush=True)
            text = out["ingest"]["text_tokenize"] = text_ingest_rate(data_dir)
            print(f"  {'text_tokenize':15} {text['tokens_per_s']:>7,} tokens/s "
                  f"({text['rows_per_s']:,} blocks/s of 128) "
                  f"over {text['tokens']:,} tokens, {text['seconds']} s with the actors' start", flush=True)

        if "streaming" in parts:  # 4. Streaming a set 4x the memory limit.
            print(f"streaming: {synth_bytes / GIB:.2f} GiB of images, limit {limit_gib:.1f} GiB per process", flush=True)
            got = trainer_run(env, data_dir, ["--dataset", "synth", "--data-pipeline", "ray-data", "--epochs", "1",
                                              "--batch-size", "128"], sample_rss=True)
            peaks = got["peak_rss_gib"]
            out["streaming"] = {"dataset_gib": round(synth_bytes / GIB, 2), "rows": synth_rows,
                                "source": load_catalog().get("synth").source.uri, "limit_gib": limit_gib,
                                "size_over_limit": round(synth_bytes / GIB / limit_gib, 2),
                                "peak_rss_gib": {k: round(v, 3) for k, v in peaks.items()},
                                "samples_per_s": got["samples_per_s"], "data_wait": got["data_wait"],
                                "wall_s": got["wall_s"], "within_limit": all(v < limit_gib for v in peaks.values())}
            print(f"  peak RSS (GiB): {out['streaming']['peak_rss_gib']}; {got['samples_per_s']:.0f} samples/s, "
                  f"data wait {got['data_wait']:.1%}", flush=True)
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=2))
    print("\nsummary")
    if "throughput" in out:
        t = out["throughput"]
        print(f"  ray-data / memory samples/s: {', '.join(f'{r:.2f}x' for r in t['ratios'])} (goal >= 0.9x)")
        print(f"  ray-data data wait: {t['data_wait_ray_data']:.1%} of step time")
    if "llm" in out:
        print(f"  llm ray-data / memory tokens/s: {', '.join(f'{r:.2f}x' for r in out['llm']['ratios'])} "
              "(goal >= 0.9x)")
    if "ingest" in out:
        print("  ingest rows/s: " + ", ".join(f"{k} {v['rows_per_s']:,}" for k, v in out["ingest"].items())
              + " (text_tokenize: blocks of 128 tokens)")
    if "streaming" in out:
        st = out["streaming"]
        print(f"  streaming {st['dataset_gib']} GiB ({st['size_over_limit']}x the {st['limit_gib']} GiB limit): "
              f"peak RSS {max(st['peak_rss_gib'].values()):.2f} GiB -> {'PASS' if st['within_limit'] else 'FAIL'}")


if __name__ == "__main__":
    main()
