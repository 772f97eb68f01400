"""Hyperparameter search with Ray Tune over any catalogued trainer, as a plain Ray job.

    ray job submit --working-dir . -- python -m trainers.tune mnist --num-samples 8 \\
        --space lr=loguniform:1e-4:1e-2 --space batch_size=choice:64,128 --epochs 3 --budget-usd 0.05

Each trial runs the trainer's own `train_func` (same step code, same per-epoch
metrics, an MLflow child run under one parent run), reported to Tune as it goes,
so ASHA stops poor trials after their first epochs. A one-worker trial trains in
the trial's own process, and Tune hands that warm process to the next trial; a
trial of several workers is a Ray Train run of its own. Configs are drawn up front
from the space (seeded) and each is validated against the trainer catalog before
anything runs. `--budget-usd`: once the measured spend of the trials (allocation
x rate x time) reaches it, no further trial is launched and the search says so.
At the end: the best config and its metric, on the console and the parent run.

On the platform a search is a job of the queue (`oppen tune`, the agent, POST /v1/jobs
with a `search`): `check_search` validates it there, the dispatcher runs this module
with `--mlflow-run-id` (the parent run it opened) once `max_concurrent` trials' gangs
fit, and `--resume` on a later attempt restarts the search from its first trial under
the same parent run (trials have no checkpoints of their own to go on from).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers import driver, runtime
from trainers.data import DataError, default_data_dir
from trainers.driver import PROGRESS
from trainers.pricing import CatalogError, load_catalog
from trainers.sources import SourceError
from trainers.specs import TRAINERS, SpecError, add_arguments, build_config, spec_for, tunable
from trainers.tracking import TrackingUnavailable, check_server, open_run, tracking_client, tracking_uri

log = logging.getLogger("tune")
TUNABLE = tunable()
DEFAULT_SPACES = {name: list(TRAINERS[name].entry.search_space) for name in TUNABLE}


# A queued search's settings (its job's `search`) and their defaults; `space` None: DEFAULT_SPACES.
SEARCH_DEFAULTS: dict[str, Any] = {"num_samples": 4, "max_concurrent": 1, "budget_usd": None, "space": None,
                                   "search_seed": 0, "grace_period": 1}
MAX_SAMPLES, MAX_CONCURRENT = 256, 64
MAX_SPACE_ITEMS, MAX_SPACE_ITEM_CHARS = 32, 200
# The queue reserves max_concurrent x one trial's gang, so every trial must have the same gang.
GANG_FIELDS = ("num_workers", "cpus_per_worker", "gpus_per_worker")


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str                 # choice, uniform, loguniform, randint
    values: tuple

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.values)
        lo, hi = self.values
        if self.kind == "uniform":
            return rng.uniform(lo, hi)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return rng.randint(int(lo), int(hi))


def parse_space(trainer: str, items: list[str]) -> list[Dimension]:
    """`name=kind:args` items, e.g. lr=loguniform:1e-4:1e-2, batch_size=choice:64,128, width=randint:8:32."""
    fields = {f.name: f for f in dataclasses.fields(spec_for(trainer))}
    dims = []
    for item in items:
        name, _, rest = item.partition("=")
        kind, _, args = rest.partition(":")
        name = name.strip().replace("-", "_")
        if name not in fields:
            raise SpecError(f"--space {item!r}: {trainer} has no parameter {name!r}; known: {', '.join(sorted(fields))}")
        try:
            if kind == "choice":
                values = tuple(_number(v) for v in args.split(",") if v != "")
                if not values:
                    raise ValueError
            elif kind in ("uniform", "loguniform", "randint"):
                lo, hi = (float(v) for v in args.split(":"))
                if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi or (kind == "loguniform" and lo <= 0):
                    raise ValueError
                values = (lo, hi)
            else:
                raise ValueError
        except ValueError:
            raise SpecError(f"--space {item!r}: expected name=choice:a,b,... or name=uniform|loguniform|randint:"
                            "low:high with finite low < high (and low > 0 for loguniform)") from None
        dims.append(Dimension(name, kind, values))
    return dims


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def sample_configs(trainer: str, space: list[Dimension], fixed: dict, n: int, seed: int) -> list[dict]:
    """n configs (fixed values + a draw from the space), each validated against the catalog."""
    rng = random.Random(seed)
    configs = []
    for _ in range(n):
        params = {**fixed, **{d.name: d.sample(rng) for d in space}}
        spec = build_config(trainer, params)  # SpecError names the bad value before any trial runs
        configs.append({k: getattr(spec, k) for k in params})
    return configs


# --------------------------------------------------------------------------- Tune pieces


def make_searcher(configs: list[dict], budget_usd: float | None, metric: str, mode: str):
    from ray.tune.search import Searcher

    class BudgetedList(Searcher):
        """Hands out the pre-drawn configs; stops handing them out once the spend reaches the budget."""

        def __init__(self):
            super().__init__(metric=metric, mode=mode)
            self.pending = list(configs)
            self.spend: dict[str, float] = {}
            self.stopped_by_budget = False

        @property
        def spent(self) -> float:
            return sum(self.spend.values())

        def suggest(self, trial_id: str):
            if budget_usd is not None and self.spent >= budget_usd:
                self.stopped_by_budget = bool(self.pending)
                return Searcher.FINISHED
            if not self.pending:
                return Searcher.FINISHED
            return self.pending.pop(0)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if "cost_usd" in result:
                self.spend[trial_id] = result["cost_usd"]

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result and "cost_usd" in result:
                self.spend[trial_id] = result["cost_usd"]

    return BudgetedList()


def in_trial_process(spec) -> bool:
    """A one-worker trial trains in the trial's own process, which Tune reuses for the next trial: no
    Ray Train worker group to start per trial (~10 s here against seconds of training). Several
    workers need Ray Train's group."""
    return spec.num_workers == 1


def trial_resources(spec) -> dict[str, float]:
    """What the trial's own process holds: the worker's share when it trains there; else only a token of
    memory, as the trial's Ray Train workers hold the CPUs/GPUs (Tune refuses an empty request, and a
    CPU share would starve a gang on a full node)."""
    if in_trial_process(spec):
        return {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    return {"memory": 1 << 20}


def trial_fn(config: dict) -> None:
    """One trial: the trainer's own `train_func`, logging to an MLflow child run, reporting to Tune; in
    this process (`in_trial_process`) or as a Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.session import IN_TRIAL

    # Tune hands this process to the next trial once this one's thread has ended; that includes
    # closing the MLflow run, so allow it more than Tune's 2 s when the server is slow.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    setup = config.pop("__oppen__")
    trainer = setup["trainer"]
    spec = build_config(trainer, config)
    trial = tune.get_context().get_trial_id()
    run_id = None
    if setup["parent_run_id"]:
        # A trial Tune restarted from its checkpoint goes on in the run it opened the first time.
        known = _trial_run(setup["uri"], setup["experiment_id"], setup["parent_run_id"], trial) \
            if tune.get_checkpoint() else None
        run_id = open_run(setup["uri"], experiment=setup["experiment"], experiment_id=setup["experiment_id"],
                          run_name=f"{setup['name']}-{trial}", run_id=known,
                          tags={"mlflow.parentRunId": setup["parent_run_id"], "oppen.trainer": trainer,
                                "oppen.tune.trial": trial})
        if not known:
            from trainers.tracking import RunTracker

            params = RunTracker(setup["uri"], run_id)
            params.log_params(dataclasses.asdict(spec))
            params.flush()
    ctx = driver.RunContext(trainer, f"{setup['name']}-{trial}", Path(setup["data_dir"]), setup["costs_file"],
                            setup["uri"], run_id, False)
    module = importlib.import_module(f"trainers.{trainer}")
    try:
        if in_trial_process(spec):
            module.train_func(driver.train_loop_config({**setup["loop_config"], IN_TRIAL: True}, spec, ctx))
        else:
            driver.torch_trainer(module.train_func, setup["loop_config"], spec, ctx,
                                 callbacks=[TuneReportCallback()], storage_path=Path(setup["storage"]),
                                 in_trial=True).fit()
    except Exception:
        driver.close_run(setup["uri"], run_id, status="FAILED")
        raise
    driver.close_run(setup["uri"], run_id, status="FINISHED")


def _trial_run(uri: str, experiment_id: str, parent: str, trial: str) -> str | None:
    """The child run a trial opened before (None when there is none)."""
    found = tracking_client(uri).search_runs(experiment_id, max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent}' and tags.`oppen.tune.trial` = '{trial}'"))
    return found[0].run_id if found else None


# --------------------------------------------------------------------------- driver


@dataclass
class SearchOutcome:
    trials: list[dict] = field(default_factory=list)
    best: dict | None = None
    spent_usd: float = 0.0
    stopped_by_budget: bool = False
    not_started: int = 0

    @property
    def processes(self) -> int:
        """How many trial processes the trials ran in (Tune reuses one for the next trial)."""
        return len({t["pid"] for t in self.trials if t.get("pid") is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.tune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name in TUNABLE:
        p = sub.add_parser(name, help=f"search {name}'s config")
        add_arguments(p, TRAINERS[name], with_defaults=False)
        s = p.add_argument_group("search")
        s.add_argument("--space", action="append", default=None,
                       help=f"name=kind:args, repeatable (default: {' '.join(DEFAULT_SPACES[name])})")
        s.add_argument("--num-samples", type=int, default=4, help="trials to draw")
        s.add_argument("--max-concurrent", type=int, default=1, help="trials at once")
        s.add_argument("--budget-usd", type=float, default=None, help="stop launching trials at this spend")
        s.add_argument("--grace-period", type=int, default=1, help="ASHA: reports before a trial may be stopped")
        s.add_argument("--search-seed", type=int, default=0)
        s.add_argument("--data-dir", type=Path, default=None)
        s.add_argument("--run-name", default=None)
        s.add_argument("--no-tracking", action="store_true")
        s.add_argument("--mlflow-run-id", default=None, help="the parent run to log into (default: a new one)")
        s.add_argument("--resume", action="store_true",
                       help="restart the search from its first trial (under the same parent run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _search(args)
    except (SpecError, DataError, CatalogError, TrackingUnavailable, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _search(args: argparse.Namespace) -> int:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainer, spec_cls = args.trainer, TRAINERS[args.trainer]
    fixed, space, configs = _plan(args)
    base = build_config(trainer, fixed)
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist. To fix: run `oppen up` or pass --data-dir.")
    costs_file = str(load_catalog().source)
    uri = tracking_uri()
    if not args.no_tracking:
        check_server(uri)
    name = args.run_name or runtime.new_run_name(f"tune-{trainer}")
    metric, mode = spec_cls.val_metric, "max" if spec_cls.val_higher_is_better else "min"
    parent = experiment_id = None
    if not args.no_tracking:
        meta = runtime.job_metadata()
        # The platform opened the parent run up front (its job record names it); alone, open one.
        parent = open_run(uri, experiment=trainer, run_name=name, run_id=args.mlflow_run_id, tags={
            "oppen.trainer": trainer, "oppen.tune": "true", "oppen.run_name": name,
            **{f"oppen.{k}": v for k, v in meta.items() if k in ("tenant", "priority")}})
        from trainers.tracking import RunTracker

        t = RunTracker(uri, parent)
        t.log_params({"space": json.dumps([dataclasses.asdict(d) for d in space]), "num_samples": args.num_samples,
                      "budget_usd": args.budget_usd, "metric": metric, "mode": mode,
                      **{f"fixed.{k}": v for k, v in fixed.items()}})
        t.flush()
        experiment_id = tracking_client(uri).run(parent).experiment_id  # for the trials' child runs
    if args.resume:
        print(f"{PROGRESS} search {name}: restarting from its first trial (a search resumes no trial)", flush=True)
    # The trainer's own preparation (e.g. fetch and tokenize), once, before trials start in parallel.
    loop_config = importlib.import_module(f"trainers.{trainer}").prepare_trials(base, data_dir)
    setup = {"trainer": trainer, "parent_run_id": parent, "uri": uri, "experiment": trainer,
             "experiment_id": experiment_id, "name": name,
             "data_dir": str(data_dir), "costs_file": costs_file, "loop_config": loop_config,
             "storage": str(data_dir / "tune" / name / "trials")}
    searcher = make_searcher([{**c, "__oppen__": setup} for c in configs], args.budget_usd, metric, mode)
    units = base.tune_reports()  # what ASHA counts
    print(f"{PROGRESS} search {name}: {len(configs)} trial(s) of {trainer}, {metric} ({mode}), "
          f"ASHA over {units} report(s), budget {args.budget_usd or 'none'}", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, trial_resources(base)),  # every trial has the same gang
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=searcher, num_samples=len(configs),
            max_concurrent_trials=args.max_concurrent,
            # The next trial takes a finished one's warm process (torch imported, data loaded).
            reuse_actors=in_trial_process(base),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max(units, 1),
                                    grace_period=args.grace_period, reduction_factor=2)),
        run_config=tune.RunConfig(
            name=name, storage_path=str(data_dir / "tune"), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # A trial training in its own process restarts from its last checkpoint, as a worker group
            # would (a Ray Train trial restarts its own workers).
            failure_config=tune.FailureConfig(max_failures=base.max_failures if in_trial_process(base) else 0)),
    )
    started = time.time()
    without_tune_result_files()
    grid = tuner.fit()
    outcome = _outcome(grid, searcher, metric, mode, len(configs))
    _report(outcome, name, metric, uri, parent, experiment_id, time.time() - started, units)
    return 0 if outcome.best else 1


def without_tune_result_files() -> None:
    """Tune adds CSV, JSON and TensorBoard result loggers of its own unless told not to. The trials'
    metrics are in their MLflow runs, and importing tensorboardX cost the search 0.8 s before its first
    trial. (Passing Tune only the CSV and JSON loggers instead costs 0.5 s more: with any callback
    given, Tune's usage record imports MLflow's integration to count them.)"""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # read by Tuner.fit


def _outcome(grid, searcher, metric: str, mode: str, drawn: int) -> SearchOutcome:
    out = SearchOutcome(spent_usd=searcher.spent, stopped_by_budget=searcher.stopped_by_budget)
    for result in grid:
        m = result.metrics or {}
        config = {k: v for k, v in (result.config or {}).items() if k != "__oppen__"}
        out.trials.append({"config": config, "trial_id": m.get("trial_id"), metric: m.get(metric),
                           "reports": m.get("training_iteration", 0), "pid": m.get("pid"),
                           "cost_usd": m.get("cost_usd"), "error": str(result.error)[:300] if result.error else None})
    out.not_started = drawn - len(out.trials)
    scored = [t for t in out.trials if t[metric] is not None]
    if scored:
        out.best = (max if mode == "max" else min)(scored, key=lambda t: t[metric])
    return out


def _close_stopped_trials(uri: str, experiment_id: str, parent: str, trials: list[dict], units: int) -> None:
    """Close the child runs trials left open: FINISHED for a trial that made all its `units` reports
    (Tune ends a trial at its last one, before its own code closes the run), else KILLED, tagged as
    stopped early (ASHA).

    A stopped trial is ended mid-fit: depending on timing its run is left RUNNING, or the interrupted
    fit closed it FAILED. Tune's own record (no error) says which trials only stopped early.
    """
    clean = {t["trial_id"] for t in trials if t["trial_id"] and not t["error"]}
    complete = {t["trial_id"] for t in trials if t["trial_id"] in clean and t["reports"] >= units}
    client = tracking_client(uri)
    for run in client.search_runs(experiment_id, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        trial = run.tags.get("oppen.tune.trial")
        if run.status == "RUNNING" and trial in complete:
            client.set_status(run.run_id, "FINISHED")
        elif run.status == "RUNNING" or (run.status == "FAILED" and trial in clean):
            client.set_tag(run.run_id, "oppen.tune.stopped_early", "true")
            client.set_status(run.run_id, "KILLED")


def _plan(args: argparse.Namespace) -> tuple[dict, list[Dimension], list[dict]]:
    """The checked search: fixed values, the space, and the drawn configs (each catalog-validated)."""
    spec_cls = TRAINERS[args.trainer]
    if args.budget_usd is not None and not args.budget_usd > 0:
        raise SpecError(f"--budget-usd must be a positive amount in USD, got {args.budget_usd}")
    if args.num_samples < 1 or args.max_concurrent < 1:
        raise SpecError("--num-samples and --max-concurrent must be at least 1")
    fixed = {f.name: getattr(args, f.name) for f in dataclasses.fields(spec_cls) if hasattr(args, f.name)}
    space = parse_space(args.trainer, args.space or DEFAULT_SPACES[args.trainer])
    return fixed, space, sample_configs(args.trainer, space, fixed, args.num_samples, args.search_seed)


def validate_search(argv: list[str]) -> tuple[str, Any]:
    """Parse and check a search command line without running it: (trainer, one trial's config)."""
    args = build_parser().parse_args(argv)
    _, _, configs = _plan(args)
    return args.trainer, build_config(args.trainer, configs[0])


def check_search(trainer: str, fixed: dict, search: dict) -> tuple[dict, Any]:
    """A queued search checked as this module will run it: (its settings with the defaults filled in,
    one trial's config). SpecError names the bad value; `fixed` are the trial's validated params."""
    search = _search_settings(trainer, search)
    _, space, configs = _plan(argparse.Namespace(trainer=trainer, **fixed, **search))
    varied = sorted({d.name for d in space} & set(GANG_FIELDS))
    if varied:
        raise SpecError(f"--space may not vary {', '.join(varied)}: the queue reserves the same gang for every "
                        "trial; set it as a fixed parameter")
    return search, build_config(trainer, configs[0])


def search_flags(search: dict) -> list[str]:
    """The command-line flags of checked search settings (`check_search`). `--space=ITEM` keeps an
    item one argument whatever it starts with."""
    flags = ["--num-samples", str(search["num_samples"]), "--max-concurrent", str(search["max_concurrent"]),
             "--search-seed", str(search["search_seed"]), "--grace-period", str(search["grace_period"])]
    if search["budget_usd"] is not None:
        flags += ["--budget-usd", repr(float(search["budget_usd"]))]
    return flags + [f"--space={item}" for item in search["space"]]


def _search_settings(trainer: str, search: dict) -> dict:
    """`search` over SEARCH_DEFAULTS, typed and bounded; the default space made explicit."""
    if trainer not in TUNABLE:
        raise SpecError(f"{trainer} cannot be searched; searchable trainers: {', '.join(TUNABLE)}")
    unknown = sorted(set(search) - set(SEARCH_DEFAULTS))
    if unknown:
        raise SpecError(f"unknown search setting(s): {', '.join(unknown)}; known: {', '.join(SEARCH_DEFAULTS)}")
    out = {**SEARCH_DEFAULTS, **{k: v for k, v in search.items() if v is not None}}
    for name, low, high in (("num_samples", 1, MAX_SAMPLES), ("max_concurrent", 1, MAX_CONCURRENT),
                            ("search_seed", 0, 2**31 - 1), ("grace_period", 1, 10_000)):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SpecError(f"--{name.replace('_', '-')} must be a whole number in [{low}, {high}], got {value!r}")
    budget = out["budget_usd"]
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
            raise SpecError(f"--budget-usd must be a positive amount in USD, got {budget!r}")
        out["budget_usd"] = float(budget)
    items = out["space"] = list(DEFAULT_SPACES[trainer]) if out["space"] is None else out["space"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_SPACE_ITEMS or not all(
            isinstance(i, str) and len(i) <= MAX_SPACE_ITEM_CHARS and i.isprintable() for i in items):
        raise SpecError(f"--space must be 1 to {MAX_SPACE_ITEMS} items, each one line of at most "
                        f"{MAX_SPACE_ITEM_CHARS} characters, got {items!r:.120}")
    return out


def _report(out: SearchOutcome, name: str, metric: str, uri: str, parent: str | None, experiment_id: str | None,
            seconds: float, units: int) -> None:
    for i, t in enumerate(out.trials, 1):
        value = "n/a" if t[metric] is None else f"{t[metric]:.4f}"
        print(f"{PROGRESS} trial {i}: {metric}={value} after {t['reports']} report(s), cost ${t['cost_usd'] or 0:.5f}"
              f" {json.dumps(t['config'])}" + (f" ERROR {t['error']}" if t["error"] else ""), flush=True)
    if out.stopped_by_budget:
        print(f"{PROGRESS} budget reached: measured spend ${out.spent_usd:.5f}; {out.not_started} drawn trial(s) "
              "were not launched", flush=True)
    print(f"{PROGRESS} {len(out.trials)} trial(s) ran in {out.processes} process(es)", flush=True)
    if out.best:
        print(f"{PROGRESS} best: {metric}={out.best[metric]:.4f} with {json.dumps(out.best['config'])}", flush=True)
    if parent:
        from trainers.tracking import RunTracker

        _close_stopped_trials(uri, experiment_id, parent, out.trials, units)
        t = RunTracker(uri, parent)
        t.log_metrics({"spent_usd": out.spent_usd, "trials": len(out.trials), "not_started": out.not_started,
                       **({f"best_{metric}": out.best[metric]} if out.best else {})}, step=0)
        t.set_tags({"oppen.tune.stopped_by_budget": str(out.stopped_by_budget).lower(),
                    **({"oppen.tune.best_config": json.dumps(out.best["config"])} if out.best else {})})
        t.flush()
        driver.close_run(uri, parent, status="FINISHED" if out.best else "FAILED")
    summary = {"search": name, "mlflow_run_id": parent, "best": out.best, "trials": len(out.trials),
               "trial_processes": out.processes, "spent_usd": out.spent_usd, "stopped_by_budget": out.stopped_by_budget,
               "not_started": out.not_started, "seconds": seconds}
    driver.print_result(summary)


if __name__ == "__main__":
    driver.exit_now(main())
