"""Cost recommendations computed from measured runs, each with the dollars it would save.

Pure functions over `RunView`s (what MLflow holds for a run); `service` loads them.
A rule speaks only when the data shows the saving; the evidence it used goes with it.

- plateau:   the validation metric stopped moving N units before the end -> stop there.
- workers:   past runs with more workers were not faster in proportion -> fewer workers.
- batch:     past runs with another batch size were faster at the same accuracy.
- spot:      the GPUs have a spot price in the catalog -> the saving, and the risk.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from trainers.pricing import Allocation, PriceCatalog

ACCURACY_TOLERANCE = 0.002   # "the same accuracy": within 0.2 percentage points
PLATEAU_TOLERANCE = 0.001    # a unit that moves the metric less than this did not help
MIN_SPEEDUP = 0.10           # a faster alternative must be at least this much faster


@dataclass
class RunView:
    run_id: str
    trainer: str
    params: dict[str, str]
    metrics: dict[str, float]                       # latest values
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # key -> step -> value

    def param(self, name: str, default: float) -> float:
        try:
            return float(self.params.get(name, default))
        except ValueError:
            return default

    @property
    def workers(self) -> int:
        return int(self.param("num_workers", 1))

    @property
    def allocation(self) -> Allocation:
        return Allocation.for_workers(self.workers, self.param("cpus_per_worker", 1),
                                      self.param("gpus_per_worker", 0))

    @property
    def cost_usd(self) -> float | None:
        return self.metrics.get("job_cost_usd", self.metrics.get("cost_usd"))

    @property
    def samples_per_s(self) -> float | None:
        return self.metrics.get("samples_per_s")


@dataclass(frozen=True)
class Recommendation:
    kind: str
    message: str
    saving_usd: float
    evidence: dict

    def as_dict(self) -> dict:
        return dict(vars(self))


def plateau(run: RunView, metric: str, higher_is_better: bool) -> Recommendation | None:
    values = run.history.get(metric) or {}
    costs = run.history.get("cost_usd") or {}
    if len(values) < 2 or not costs:
        return None
    steps = sorted(values)
    final_best = (max if higher_is_better else min)(values.values())
    # The first unit after which no later unit improved on it by more than the tolerance.
    for step in steps:
        gain = final_best - values[step] if higher_is_better else values[step] - final_best
        if gain <= PLATEAU_TOLERANCE:
            break
    last = steps[-1]
    if step == last or step not in costs or last not in costs:
        return None
    saving = costs[last] - costs[step]
    if saving <= 0:
        return None
    return Recommendation(
        "plateau",
        f"{metric} was within {PLATEAU_TOLERANCE:g} of its best after unit {step} of {last}: stopping there "
        f"(e.g. --epochs {step}, or early stopping with patience) would have saved ${saving:.4f}.",
        saving, {"metric": metric, "values": {str(k): values[k] for k in steps}, "stop_at": step, "ran": last})


def _mean_speed(runs: list[RunView]) -> float:
    return statistics.fmean(r.samples_per_s for r in runs)


def fewer_workers(run: RunView, past: list[RunView], catalog: PriceCatalog) -> Recommendation | None:
    """More workers cost proportionally more; worth it only if samples/s rose in proportion."""
    if run.cost_usd is None or run.workers <= 1:
        return None
    by_workers: dict[int, list[RunView]] = {}
    for r in [run, *past]:
        if r.samples_per_s:
            by_workers.setdefault(r.workers, []).append(r)
    mine = by_workers.get(run.workers)
    if not mine:
        return None
    my_speed, my_rate = _mean_speed(mine), catalog.hourly_usd(run.allocation)
    best = None
    for w, runs in by_workers.items():
        if w >= run.workers:
            continue
        speed, rate = _mean_speed(runs), catalog.hourly_usd(runs[0].allocation)
        # Same work at their speed and rate: cost scales with rate x time, time with 1/speed.
        new_cost = run.cost_usd * (rate / my_rate) * (my_speed / speed)
        saving = run.cost_usd - new_cost
        if saving > 0 and (best is None or saving > best[0]):
            best = (saving, w, speed)
    if best is None:
        return None
    saving, w, speed = best
    return Recommendation(
        "workers",
        f"{run.workers} workers ran at {my_speed:.0f} samples/s against {speed:.0f} with {w} in past runs: "
        f"the extra workers cost more than the speed they added. {w} worker(s) would have saved ${saving:.4f}.",
        saving, {"samples_per_s_by_workers": {str(k): _mean_speed(v) for k, v in sorted(by_workers.items())},
                 "runs_by_workers": {str(k): len(v) for k, v in sorted(by_workers.items())}})


def better_batch(run: RunView, past: list[RunView], metric: str, higher_is_better: bool
                 ) -> Recommendation | None:
    my_metric, my_speed = run.metrics.get(metric), run.samples_per_s
    if run.cost_usd is None or my_metric is None or not my_speed:
        return None
    my_batch = run.params.get("batch_size")
    best = None
    for r in past:
        other, speed = r.metrics.get(metric), r.samples_per_s
        if (r.workers != run.workers or r.params.get("batch_size") in (None, my_batch) or other is None
                or not speed or speed < my_speed * (1 + MIN_SPEEDUP)):
            continue
        as_good = other >= my_metric - ACCURACY_TOLERANCE if higher_is_better else other <= my_metric * 1.01
        if as_good and (best is None or speed > best.samples_per_s):
            best = r
    if best is None:
        return None
    saving = run.cost_usd * (1 - my_speed / best.samples_per_s)
    return Recommendation(
        "batch_size",
        f"batch size {best.params['batch_size']} ran at {best.samples_per_s:.0f} samples/s against "
        f"{my_speed:.0f} at {my_batch}, reaching {metric} {best.metrics[metric]:.4f} (this run "
        f"{my_metric:.4f}): it would have saved ${saving:.4f}.",
        saving, {"run_id": best.run_id, "batch_size": best.params["batch_size"],
                 "samples_per_s": best.samples_per_s, metric: best.metrics[metric]})


def spot(run: RunView, catalog: PriceCatalog) -> Recommendation | None:
    alloc = run.allocation
    gpu_usd = run.metrics.get("job_cost_gpu_usd", run.metrics.get("cost_gpu_usd"))
    if not alloc.gpus or not gpu_usd:
        return None
    price = catalog.gpu(alloc.gpu_type)
    if price.spot_hour is None or price.spot_hour >= price.on_demand_hour:
        return None
    saving = gpu_usd * (1 - price.spot_hour / price.on_demand_hour)
    return Recommendation(
        "spot",
        f"{price.name} GPUs at the spot price (${price.spot_hour}/h against ${price.on_demand_hour}/h) would "
        f"have saved ${saving:.4f}. Risk: spot capacity can be reclaimed at any time; the job checkpoints each "
        "unit and the queue requeues a stopped job to resume, so a reclaim costs the unit in progress.",
        saving, {"gpu_type": price.name, "on_demand_hour": price.on_demand_hour, "spot_hour": price.spot_hour,
                 "gpu_usd": gpu_usd})


def recommend(run: RunView, past: list[RunView], catalog: PriceCatalog, *, metric: str,
              higher_is_better: bool) -> list[Recommendation]:
    """Every rule that has evidence, biggest saving first."""
    others = [r for r in past if r.run_id != run.run_id]
    found = [plateau(run, metric, higher_is_better), fewer_workers(run, others, catalog),
             better_batch(run, others, metric, higher_is_better), spot(run, catalog)]
    return sorted((r for r in found if r is not None), key=lambda r: -r.saving_usd)
