"""The scheduler, measured against its anchors in one run.

    .venv/bin/python benchmarks/scheduler.py              # everything, (b) starts a local cluster
    .venv/bin/python benchmarks/scheduler.py --sim-only   # (a), (c)-(f): no Ray; ~1.5 minutes on 2 cores

Results: printed (a summary as JSON, then each goal with PASS/FAIL computed from the figures) and
written in full to benchmarks/results/scheduler.json.

(a) The policy alone (`policy.plan`) on simulated queues of 1k..20k jobs over
    1,000 GPUs (125 nodes x 8): decisions (queued jobs considered) per second,
    and how the time grows with the queue. Then 10,000 queued jobs of 100 tenants in
    10 cohorts (nominal 10 GPUs each, borrowing up to 30, lending up to 6) with decayed
    usage, forecasts, checkpoints and budgets: best of 3 (goal >= 10,000 decisions/s),
    the old policy on the same queue beside it.
(b) On a local cluster (2 logical GPUs): a chain of probe jobs that each need
    both GPUs goes through the queue; latency from one job's end (Ray's end_time)
    to the next one RUNNING (Ray's start_time), p50/p95, against the same probe
    submitted straight to `JobSubmissionClient.submit_job`, submit to RUNNING
    (goal: the queue adds <= 0.5 s p50).
(c) A replay of one synthetic trace through the policy of commit e2c6174
    (`benchmarks/policy_before.py`: FIFO per class with aging, hard quotas, newest-first
    victims) and through the new one, killing victims or draining them (a drained victim
    saves its progress at once and is gone by the next cycle; the cycle counts as lost).
    Trace (`make_trace`, seeded): 10 tenants of weight 1 and very different patterns (one
    submits 220 jobs first, steady, 8-hourly bursts, diurnal, few big long gangs, many small
    short jobs), 36 h of submissions at ~1.2x the capacity; run times lognormal (median
    45 min, p95 ~5 h, 3 min..30 h); gangs of 1-8 GPUs as 1-8 workers; classes low/normal/high
    30/55/15%; a checkpoint every 5-60 min of progress, per job; forecasts: actual = middle x
    lognormal(0, 0.35), the interval its 90% band. Cluster: 16 nodes x 8 GPUs, quotas of 64
    GPUs a tenant; configs/queue.yaml's classes and aging (30 min a rank, high may preempt
    after 30 s) with high allowed to stop other tenants' jobs. Simulator: one plan() per
    simulated minute; free nodes = nodes less running gangs placed first-fit; jobs end
    exactly within a minute and are seen at the next cycle; a killed victim loses its work
    since its last checkpoint and resumes from it (requeued with its submission time); the
    new policy gets `ends_at` = attempt start + forecast low of what remains, `checkpoint_at`,
    `run_s` (forecast high of what remains) and decayed usage (kept incrementally, checked
    against one full `decayed_usage` at the end).
    Reported per run: GPU utilisation while jobs wait (GPU-seconds held / available over the
    cycles in which at least one job waited; also less the work later lost, and over the
    whole makespan); wait (submission to first start) p50/p95 by class; Jain's index over
    tenants of x = GPU-seconds received / GPU-seconds of the tenant's max-min fair share,
    both summed over the cycles in which a job waited, the share water-filled over 128 GPUs
    from each tenant's demand (GPUs held + queued, at most its quota), equal weights (also
    Jain over raw GPU-seconds in the cycles in which every tenant had a job queued, with
    how long that was); preemptions and GPU-hours lost; for the new policy's own decisions
    the loss had its victims been chosen newest first (as many GPUs freed); idle GPU-hours
    while jobs wait, by why the first blocked job waits, and how many of them jobs held behind
    a reservation would have fitted; how often a preemptor starts at the next cycle.
    Goals: the new policy loses <= 50% of the work the old one does (killing and draining);
    Jain >= 0.9; utilisation while jobs wait not lower than before.
(d) The same trace, new policy, with monthly $ budgets for three tenants (half their jobs'
    forecast cost, $2.5/GPU-hour): spend counts running jobs' committed forecast highs (and,
    to compare, only what is metered). Goal: no tenant's spend exceeds its budget by more
    than its largest single-job forecast error (actual cost, every attempt, less the forecast
    high).
(e) Sensitivity: (c) with an hour a rank and high preempting after 10 minutes.
(f) Four more traces (other seeds): the goals of (c) on each.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import policy_before as before  # noqa: E402
from ray_apps.scheduler import policy  # noqa: E402
from ray_apps.scheduler.policy import Gang, PolicyConfig, PriorityClass, QueuedJob, Quota, RunningJob, plan  # noqa: E402

BENCH = {"ray": {"gcs_port": 6679, "dashboard_port": 8565, "metrics_export_port": 8380, "dashboard_agent_port": 52665},
         "cluster_file": "configs/cluster.single-head.yaml", "mlflow": {"port": 5300}, "serve_port": 8300,
         "metrics_port": 9483, "serve_proxy": {"stats_port": 8374, "metrics_port": 9173, "fallback_port": 8375},
         "prometheus": {"enabled": False}}


def policy_bench() -> dict:
    cfg = PolicyConfig(classes={"low": PriorityClass("low", 0), "normal": PriorityClass("normal", 1),
                                "high": PriorityClass("high", 2, preempt_after_s=600)},
                       quotas={f"t{i}": Quota(cpus=400, gpus=60) for i in range(20)}, aging_s=1800)
    nodes = [{"CPU": 64.0, "GPU": 8.0} for _ in range(125)]
    rng = random.Random(0)
    out = {}
    for n in (1_000, 2_000, 5_000, 10_000, 20_000):
        queued = [QueuedJob(f"q{i}", f"t{rng.randrange(20)}", rng.choice(["low", "normal", "high"]),
                            submitted_at=i, gang=Gang(rng.choice([1, 1, 2, 4]), 4, rng.choice([0, 1, 1, 2])))
                  for i in range(n)]
        running = [RunningJob(f"r{i}", f"t{i % 20}", "low", started_at=i, gang=Gang(1, 4, 1)) for i in range(500)]
        free = [dict(node, GPU=node["GPU"] - 4) for node in nodes]  # half the GPUs busy
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            p = plan(queued, running, free, cfg, now=n + 3600)
            best = min(best, time.perf_counter() - t0)
        out[n] = {"seconds": best, "decisions_per_s": n / best, "admitted": len(p.admit),
                  "preempted": len(p.preempt)}
        print(f"  {n:6} queued: {best * 1000:7.1f} ms per plan, {n / best:10,.0f} decisions/s, "
              f"{len(p.admit)} admitted, {len(p.preempt)} preempted", flush=True)
    return out


def cohort_bench(n: int = 10_000) -> dict:
    """One plan() over n queued jobs of 100 tenants in 10 cohorts (nominal 10 GPUs each, borrowing up to
    30 more, lending up to 6), 1,000 GPUs half busy, with decayed usage, forecasts, checkpoints and
    budgets for 20 tenants: best of 3, against the old policy on the same queue."""
    rng = random.Random(1)
    now = 200_000.0
    tenants = [f"t{i}" for i in range(100)]
    quotas = {t: policy.Quota(cpus=80, gpus=10, cohort=f"c{i // 10}", borrow_cpus=240, borrow_gpus=30,
                              lend_cpus=48, lend_gpus=6) for i, t in enumerate(tenants)}
    classes = sim_classes(policy, PREEMPT_AFTER_S)
    cfg = policy.PolicyConfig(classes=classes, quotas=quotas, aging_s=AGING_S,
                              budgets={t: policy.Budget(usd=rng.choice((500.0, 2000.0, 10_000.0)))
                                       for t in tenants[::5]})
    nodes = [{"CPU": 64.0, "GPU": 8.0} for _ in range(125)]
    gang = [policy.Gang(1, 4, 1), policy.Gang(1, 8, 2), policy.Gang(1, 16, 4), policy.Gang(2, 16, 4),
            policy.Gang(1, 32, 8)]
    queued = []
    for i in range(n):
        g = rng.choice(gang)
        run_s = 600 * rng.lognormvariate(1.5, 1.0)
        queued.append(policy.QueuedJob(f"q{i}", rng.choice(tenants), rng.choice(["low", "normal", "normal", "high"]),
                                       submitted_at=now - rng.uniform(0, 36_000), gang=g, run_s=run_s,
                                       cost_usd=g.gpus * run_s / HOUR * PRICE_PER_GPU_HOUR))
    running, free = [], [dict(node) for node in nodes]
    for i in range(500):  # 4 GPUs on every node
        node = free[i // 4]
        node["GPU"] -= 1.0
        node["CPU"] -= 4.0
        start = now - rng.uniform(0, 20_000)
        running.append(policy.RunningJob(f"r{i}", tenants[i % 100], rng.choice(["low", "normal"]), start,
                                         policy.Gang(1, 4, 1), checkpoint_at=start + rng.uniform(0, now - start),
                                         ends_at=now + rng.uniform(-600, 20_000)))
    intervals = [(rng.choice(tenants), s0, s0 + rng.uniform(60, 20_000), 4.0, 1.0)
                 for s0 in (rng.uniform(0, now) for _ in range(5_000))]
    usage = policy.decayed_usage(intervals, now, cfg.fair)
    spend = {t: policy.Spend(usd=rng.uniform(0, 1_000)) for t in cfg.budgets}
    best, p = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        p = policy.plan(queued, running, free, cfg, now=now, usage=usage, spend=spend)
        best = min(best, time.perf_counter() - t0)
    old_cfg = before.PolicyConfig(classes=sim_classes(before, PREEMPT_AFTER_S),
                                  quotas={t: before.Quota(cpus=80 + 240, gpus=40) for t in tenants}, aging_s=AGING_S)
    old_q = [before.QueuedJob(j.id, j.tenant, j.priority, j.submitted_at,
                              before.Gang(j.gang.workers, j.gang.cpus_per_worker, j.gang.gpus_per_worker))
             for j in queued]
    old_r = [before.RunningJob(j.id, j.tenant, j.priority, j.started_at, before.Gang(1, 4, 1)) for j in running]
    old_best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        before.plan(old_q, old_r, free, old_cfg, now=now)
        old_best = min(old_best, time.perf_counter() - t0)
    kinds: dict[str, int] = {}
    for w in p.waiting.values():
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
    out = {"queued": n, "tenants": 100, "cohorts": 10, "gpus": 1000, "seconds": best, "decisions_per_s": n / best,
           "admitted": len(p.admit), "preempted": len(p.preempt), "backfilled": len(p.backfilled),
           "rejected": len(p.reject), "waiting_by_kind": kinds,
           "old_policy_seconds": old_best, "old_policy_decisions_per_s": n / old_best}
    print(f"  {n:6} queued, 100 tenants in 10 cohorts: {best * 1000:7.1f} ms per plan, {n / best:10,.0f} "
          f"decisions/s, {len(p.admit)} admitted ({len(p.backfilled)} backfilled), {len(p.preempt)} preempted; "
          f"old policy {old_best * 1000:.1f} ms", flush=True)
    return out


def start_platform(tmp: Path):
    import yaml

    from ray_apps import cluster
    from ray_apps.config import load_settings

    cfg = tmp / "platform.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp / "data"), **BENCH}))
    (tmp / "queue.yaml").write_text(yaml.safe_dump({"poll_s": 0.2}))
    import os

    os.environ["OPPEN_CONFIG"], os.environ["OPPEN_CONFIG_DIR"] = str(cfg), str(tmp)
    settings = load_settings(cfg)
    cluster.up(settings, timeout=120, say=lambda s: None)
    cluster.use_ray_token()
    return settings


def cluster_bench(settings, chain: int = 8) -> dict:
    from ray.job_submission import JobSubmissionClient

    from ray_apps.scheduler.api import Queue
    from ray_apps.scheduler.config import QueueConfig
    from ray_apps.training import entrypoint_for, submit_entrypoint

    client = JobSubmissionClient(settings.dashboard_url)
    params = {"seconds": 1.0, "num_workers": 1, "gpus_per_worker": 2}

    raw = []
    for i in range(chain):
        sid = f"raw-{int(time.time())}-{i}"
        t0 = time.time()
        submit_entrypoint(settings, sid, entrypoint_for("probe", params), {})
        while client.get_job_status(sid).value not in ("SUCCEEDED", "FAILED"):
            time.sleep(0.1)
        info = client.get_job_info(sid)
        raw.append(info.start_time / 1000 - t0)  # start_time: Ray's own RUNNING time

    queue = Queue.from_settings(settings, QueueConfig(poll_s=0.2))
    ids = [queue.submit("probe", params).id for _ in range(chain)]
    while not all(queue.get(i).state.is_terminal() for i in ids):
        time.sleep(0.5)
    infos = [client.get_job_info(queue.get(i).ray_submission_id) for i in ids]
    infos.sort(key=lambda j: j.start_time)
    gaps = [(b.start_time - a.end_time) / 1000 for a, b in zip(infos, infos[1:])]
    assert all(queue.get(i).state.value == "SUCCEEDED" for i in ids)

    def pct(xs, q):
        return statistics.quantiles(xs, n=20)[q // 5 - 1] if len(xs) > 1 else xs[0]

    return {"raw_submit_to_running_s": {"p50": statistics.median(raw), "p95": pct(raw, 95), "all": raw},
            "queue_free_to_running_s": {"p50": statistics.median(gaps), "p95": pct(gaps, 95), "all": gaps},
            "queue_overhead_p50_s": statistics.median(gaps) - statistics.median(raw)}


# --------------------------------------------------------------------------- (c)-(e): the replay

STEP_S = 60.0                  # one plan() per simulated minute, as a dispatcher cycle
NODES, GPUS_PER_NODE, CPUS_PER_NODE, CPUS_PER_GPU = 16, 8, 64.0, 4.0
PRICE_PER_GPU_HOUR = 2.5
HOUR = 3600.0
SUBMIT_HOURS = 36.0            # submissions span this; the replay runs until every job is done
MAX_SIM_HOURS = 24.0 * 8       # a hard stop, reported if reached
FORECAST_SIGMA = 0.35          # actual = forecast_mid x lognormal(0, sigma); interval = 90%
Z90 = 1.645
QUOTA_GPUS = 64                # every tenant, both policies: at most half the cluster
AGING_S = 1800.0               # both policies, as configs/queue.yaml: 30 min of waiting is worth one rank
PREEMPT_AFTER_S = 30.0         # high may preempt once it has waited this long (configs/queue.yaml)
BUDGET_TENANTS = ("t1", "t4", "t8")
BUDGET_SHARE = 0.5             # their monthly budget: half of what their trace's jobs are forecast to cost

TENANTS = {  # name: submission pattern (all weights 1)
    "t0": "burst-first: 220 jobs in its first 5 minutes, then a trickle (rate/4)",
    "t1": "steady Poisson", "t2": "steady Poisson", "t3": "steady Poisson",
    "t4": "bursts of 30 jobs every 8 h (from 1 h)", "t5": "bursts of 30 jobs every 8 h (from 5 h)",
    "t6": "diurnal: 2 x rate from 09:00 to 18:00", "t7": "diurnal: 2 x rate from 09:00 to 18:00",
    "t8": "few big long jobs: rate/3, 8 GPUs, 3 x longer",
    "t9": "many small short jobs: 3 x rate, 1 GPU, 4 x shorter",
}
RATE_PER_H = 2.6               # 'rate': a steady tenant's submissions per hour


@dataclass
class SimJob:
    id: str
    tenant: str
    priority: str
    submit: float
    workers: int
    gpw: int                   # GPUs per worker
    work_s: float              # its real run time, uninterrupted
    lo_s: float                # forecast run time: 90% interval around a noisy middle
    hi_s: float
    ckpt_s: float              # checkpoints every ckpt_s of progress
    saved: float = 0.0         # progress in its last checkpoint: where an attempt resumes
    start: float | None = None  # this attempt's start (None: not running)
    attempt_hi: float = 0.0    # this attempt's forecast run time, upper bound (committed spend)
    stop_at: float | None = None  # draining: stops then, its progress as of drain_from saved
    drain_from: float = 0.0
    drain_keep: float = 0.0
    placed: list[int] = field(default_factory=list)
    first_start: float | None = None
    done_at: float | None = None
    rejected: bool = False
    used_gpu_s: float = 0.0
    lost_gpu_s: float = 0.0
    preemptions: int = 0

    @property
    def gpus(self) -> int:
        return self.workers * self.gpw

    def end(self) -> float:
        return self.start + self.work_s - self.saved

    def last_ckpt(self, t: float) -> float:
        """Progress in its last checkpoint at time t (checkpoints every ckpt_s from where it resumed)."""
        done = t - self.start
        return self.saved + math.floor(done / self.ckpt_s) * self.ckpt_s

    def rem_lo(self) -> float:
        return max(0.0, self.lo_s - self.saved)

    def rem_hi(self) -> float:
        return max(self.hi_s - self.saved, 0.1 * self.hi_s)


def make_trace(seed: int = 17) -> list[SimJob]:
    """The synthetic trace: seeded, so both policies replay the same jobs."""
    rng = random.Random(seed)
    jobs: list[SimJob] = []
    horizon = SUBMIT_HOURS * HOUR

    def poisson(rate_per_h: float, begin: float = 0.0, end: float = horizon, hours=None):
        t, out = begin, []
        while True:
            t += rng.expovariate(rate_per_h / HOUR)
            if t >= end:
                return out
            if hours is None or hours[0] <= (t / HOUR) % 24 < hours[1]:
                out.append(t)

    def add(tenant: str, at: float, scale: float = 1.0, gpus: int | None = None) -> None:
        g = gpus or rng.choices((1, 2, 4, 8), (35, 25, 25, 15))[0]
        gpw = rng.choice([d for d in (1, 2, 4, 8) if d <= g])
        # Heavy tail: lognormal, median 45 min x scale, sigma 1.3 (p95 ~6 h x scale), 3 min to 30 h.
        work = min(30 * HOUR, max(180.0, scale * 45 * 60 * rng.lognormvariate(0.0, 1.3)))
        mid = work / rng.lognormvariate(0.0, FORECAST_SIGMA)
        jobs.append(SimJob(f"{tenant}-{len(jobs)}", tenant,
                           rng.choices(("low", "normal", "high"), (30, 55, 15))[0], at, g // gpw, gpw, work,
                           lo_s=mid * math.exp(-Z90 * FORECAST_SIGMA), hi_s=mid * math.exp(Z90 * FORECAST_SIGMA),
                           ckpt_s=60.0 * rng.uniform(5, 60)))  # not on the cycles' grid

    for _ in range(220):
        add("t0", rng.uniform(0, 300))
    for at in poisson(RATE_PER_H / 4, begin=300):
        add("t0", at)
    for tenant in ("t1", "t2", "t3"):
        for at in poisson(RATE_PER_H):
            add(tenant, at)
    for tenant, first in (("t4", 1.0), ("t5", 5.0)):
        burst = first * HOUR
        while burst < horizon:
            for _ in range(30):
                add(tenant, burst + rng.uniform(0, 900))
            burst += 8 * HOUR
    for tenant in ("t6", "t7"):
        for at in poisson(2 * RATE_PER_H, hours=(9, 18)):
            add(tenant, at)
    for at in poisson(RATE_PER_H / 3):
        add("t8", at, scale=3.0, gpus=8)
    for at in poisson(3 * RATE_PER_H):
        add("t9", at, scale=0.25, gpus=1)
    jobs.sort(key=lambda j: (j.submit, j.id))
    return jobs


def sim_classes(mod, preempt_after_s: float) -> dict:
    # configs/queue.yaml's classes, with `preempts_other_tenants: true` on high (its own tenant's jobs only
    # would leave little to compare); no minimum runtime, which the old policy does not have.
    return {"low": mod.PriorityClass("low", 0), "normal": mod.PriorityClass("normal", 1),
            "high": mod.PriorityClass("high", 2, preempt_after_s=preempt_after_s, preempts_other_tenants=True)}


def budgets_for(jobs: list[SimJob]) -> dict[str, float]:
    """Each budget tenant's monthly $ budget: BUDGET_SHARE of its jobs' forecast (middle) cost, in $10s."""
    out = {}
    for tenant in BUDGET_TENANTS:
        mid = sum(j.gpus * math.sqrt(j.lo_s * j.hi_s) for j in jobs if j.tenant == tenant) / HOUR
        out[tenant] = round(BUDGET_SHARE * mid * PRICE_PER_GPU_HOUR, -1)
    return out


def water_fill(demand: dict[str, float], capacity: float) -> dict[str, float]:
    """Max-min fair shares (equal weights) of `capacity` over tenants' demands."""
    share, left, todo = {}, capacity, sorted(demand.items(), key=lambda kv: kv[1])
    for i, (tenant, d) in enumerate(todo):
        share[tenant] = min(d, left / (len(todo) - i))
        left -= share[tenant]
    return share


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def jain(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return (sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))) if xs and any(xs) else None


def replay(trace: list[SimJob], new: bool, *, drain: bool = False, budgets: dict[str, float] | None = None,
           commit_running: bool = True, aging_s: float = AGING_S, preempt_after_s: float = PREEMPT_AFTER_S,
           report_budgets: dict[str, float] | None = None, diagnose: bool = False) -> dict:
    """Replay `trace` through the old (`new`=False) or new policy, one plan() per STEP_S.

    `drain`: a victim is asked to checkpoint and stops at the next cycle, losing at most that cycle
    (else it is killed and loses everything since its last checkpoint). `budgets`: $ per tenant the
    new policy enforces; `commit_running`: spend counts running jobs' forecast upper bounds (else
    only what is metered so far). `report_budgets`: tenants whose spend the summary shows. `diagnose`:
    also count the idle GPUs that jobs waiting behind a reservation would have fitted (new policy)."""
    mod = policy if new else before
    jobs = [replace(j, placed=[]) for j in trace]
    by_id = {j.id: j for j in jobs}
    fair = policy.FairShare()
    budgets = budgets or {}
    classes = sim_classes(mod, preempt_after_s)
    if new:
        cfg = policy.PolicyConfig(classes=classes, quotas={t: policy.Quota(gpus=QUOTA_GPUS) for t in TENANTS},
                                  aging_s=aging_s, fair=fair,
                                  budgets={t: policy.Budget(usd=b) for t, b in budgets.items()})
    else:
        cfg = before.PolicyConfig(classes=classes, quotas={t: before.Quota(gpus=QUOTA_GPUS) for t in TENANTS},
                                  aging_s=aging_s)
    gangs = {j.id: mod.Gang(j.workers, CPUS_PER_GPU * j.gpw, float(j.gpw)) for j in jobs}
    free_gpu = [float(GPUS_PER_NODE)] * NODES
    free_cpu = [CPUS_PER_NODE] * NODES
    queued: dict[str, SimJob] = {}
    running: dict[str, SimJob] = {}
    nxt = 0
    usage_done: dict[str, float] = {}   # decayed usage of ended attempts, as of usage_t
    usage_t = 0.0
    ended: list[tuple[str, float, float, float, float]] = []  # attempts ended since usage_t
    metered: dict[str, float] = {}      # $ of ended attempts per tenant
    attempts: list[tuple[str, float, float, float, float]] = []  # every ended attempt (a final check)
    stats = {"preemptions": 0, "lost_gpu_s": 0.0, "backfilled": 0, "plan_calls": 0, "plan_s": 0.0,
             "contended_steps": 0, "contended_gpu_s": 0.0, "all_queued_steps": 0,
             "cf_own_gpu_s": 0.0, "cf_newest_gpu_s": 0.0, "preemptor_cycles": 0, "preemptor_started_next": 0,
             "idle_gpu_s": {}, "held_back_gpu_s": 0.0}
    rounds: dict[str, int] = {}         # preemptor -> cycles in which it preempted
    preempting: set[str] = set()        # who preempted in the last cycle
    recv = {t: 0.0 for t in TENANTS}    # GPU-seconds received during contended steps
    fair_s = {t: 0.0 for t in TENANTS}  # their max-min fair share of those steps, GPU-seconds
    recv_all = {t: 0.0 for t in TENANTS}  # GPU-seconds received while every tenant had a job queued
    t0_wall = time.perf_counter()

    def stop(j: SimJob, at: float, keep: float) -> None:
        """End j's attempt at `at`, its progress `keep` saved."""
        j.used_gpu_s += j.gpus * (at - j.start)
        iv = (j.tenant, j.start, at, float(j.gpus * CPUS_PER_GPU), float(j.gpus))
        ended.append(iv)
        attempts.append(iv)
        metered[j.tenant] = metered.get(j.tenant, 0.0) + j.gpus * (at - j.start) / HOUR * PRICE_PER_GPU_HOUR
        for n in j.placed:
            free_gpu[n] += j.gpw
            free_cpu[n] += CPUS_PER_GPU * j.gpw
        j.placed, j.start, j.stop_at, j.saved = [], None, None, keep
        del running[j.id]

    t = 0.0
    while True:
        # Ends and drained stops within the last cycle, seen now.
        for j in list(running.values()):
            e = j.end()
            if j.stop_at is not None and j.stop_at < e and j.stop_at <= t:
                lost = (j.stop_at - j.drain_from) * j.gpus  # its checkpoint and exit: no progress
                j.lost_gpu_s += lost
                stats["lost_gpu_s"] += lost
                stop(j, j.stop_at, j.drain_keep)
                queued[j.id] = j
            elif e <= t:
                stop(j, e, j.work_s)
                j.done_at = e
        while nxt < len(jobs) and jobs[nxt].submit <= t:
            queued[jobs[nxt].id] = jobs[nxt]
            nxt += 1
        if not queued and not running and nxt == len(jobs):
            break
        free_nodes = [{"CPU": c, "GPU": g} for c, g in zip(free_cpu, free_gpu)]
        live = [j for j in running.values() if j.stop_at is None]
        if new:
            q = [policy.QueuedJob(j.id, j.tenant, j.priority, j.submit, gangs[j.id], run_s=j.rem_hi(),
                                  cost_usd=j.gpus * j.rem_hi() / HOUR * PRICE_PER_GPU_HOUR) for j in queued.values()]
            r = []
            for j in live:
                ck = j.last_ckpt(t)
                r.append(policy.RunningJob(j.id, j.tenant, j.priority, j.start, gangs[j.id],
                                           checkpoint_at=j.start + ck - j.saved if ck > j.saved else None,
                                           ends_at=j.start + j.rem_lo()))
            # Decayed usage: ended attempts kept incrementally, running ones added each cycle.
            decay = 2 ** (-(t - usage_t) / fair.half_life_s)
            usage_done = {k: v * decay for k, v in usage_done.items()}
            for k, v in policy.decayed_usage(ended, t, fair).items():
                usage_done[k] = usage_done.get(k, 0.0) + v
            ended.clear()
            usage_t = t
            usage = dict(usage_done)
            for k, v in policy.decayed_usage([(j.tenant, j.start, t, j.gpus * CPUS_PER_GPU, j.gpus)
                                              for j in running.values()], t, fair).items():
                usage[k] = usage.get(k, 0.0) + v
            spend = {}
            for tenant in budgets:
                usd = metered.get(tenant, 0.0)
                for j in running.values():
                    if j.tenant == tenant:
                        so_far = t - j.start if j.stop_at is None else j.stop_at - j.start
                        usd += j.gpus * (max(j.attempt_hi, so_far) if commit_running else so_far) / HOUR \
                            * PRICE_PER_GPU_HOUR
                spend[tenant] = policy.Spend(usd=usd)
            c0 = time.perf_counter()
            p = policy.plan(q, r, free_nodes, cfg, now=t, usage=usage, spend=spend,
                            active_jobs=len(running))
        else:
            ended.clear()
            q = [before.QueuedJob(j.id, j.tenant, j.priority, j.submit, gangs[j.id]) for j in queued.values()]
            r = [before.RunningJob(j.id, j.tenant, j.priority, j.start, gangs[j.id]) for j in live]
            c0 = time.perf_counter()
            p = before.plan(q, r, free_nodes, cfg, now=t)
        stats["plan_s"] += time.perf_counter() - c0
        stats["plan_calls"] += 1
        for jid in getattr(p, "reject", {}):
            queued.pop(jid).rejected = True
        if new and not drain and p.preempt:  # the same decisions, had the victims been chosen newest first
            counterfactual(p, queued, running, classes, t, stats)
        for jid in p.preempt:
            j = by_id[jid]
            since = t - j.start
            ck = j.last_ckpt(t)
            stats["preemptions"] += 1
            j.preemptions += 1
            if drain and (t - j.start) - (ck - j.saved) > STEP_S:
                # Asked to checkpoint: it saves its progress as of now and is gone by the next cycle.
                # (Its loss, the cycle, is counted when it stops: if it ends first, nothing is lost.)
                j.stop_at, j.drain_from, j.drain_keep = t + STEP_S, t, j.saved + since
            else:
                lost = (j.saved + since - ck) * j.gpus
                stop(j, t, ck)
                queued[j.id] = j
                j.lost_gpu_s += lost
                stats["lost_gpu_s"] += lost
        for jid in p.admit:
            j = queued.pop(jid)
            for _ in range(j.workers):
                n = next(n for n in range(NODES) if free_gpu[n] >= j.gpw - 1e-9
                         and free_cpu[n] >= CPUS_PER_GPU * j.gpw - 1e-9)
                free_gpu[n] -= j.gpw
                free_cpu[n] -= CPUS_PER_GPU * j.gpw
                j.placed.append(n)
            j.start, j.attempt_hi = t, j.rem_hi()
            if j.first_start is None:
                j.first_start = t
            running[j.id] = j
        stats["backfilled"] += len(getattr(p, "backfilled", ()))
        # Did last cycle's preemptors start now? Who preempts this cycle?
        stats["preemptor_started_next"] += len(preempting & set(p.admit))
        preempting = {jid for jid, w in p.waiting.items() if str(w).startswith("preempting")}
        stats["preemptor_cycles"] += len(preempting)
        for jid in preempting:
            rounds[jid] = rounds.get(jid, 0) + 1
        if queued:  # GPUs left idle this cycle while jobs wait, by why the first blocked one waits
            idle = sum(free_gpu) * STEP_S
            if idle > 0:
                stats["idle_gpu_s"][idle_cause(p, new)] = stats["idle_gpu_s"].get(idle_cause(p, new), 0.0) + idle
                if diagnose and new:  # jobs behind a reservation that fit, in order, what is still free
                    nodes = [{"CPU": c, "GPU": g} for c, g in zip(free_cpu, free_gpu)]
                    for jid in p.order:
                        w = p.waiting.get(jid)
                        if w is not None and w.kind == "behind":
                            fits = policy.place(gangs[jid], nodes)
                            if fits is not None:
                                nodes = fits
                                stats["held_back_gpu_s"] += by_id[jid].gpus * STEP_S
        # What each tenant holds during [t, t + STEP_S), and what it wants.
        held = {tn: 0.0 for tn in TENANTS}
        for j in running.values():
            until = min(j.end(), j.stop_at if j.stop_at is not None else math.inf, t + STEP_S)
            held[j.tenant] += j.gpus * (until - t)
        if queued:
            stats["contended_steps"] += 1
            stats["contended_gpu_s"] += sum(held.values())
            want = {tn: 0.0 for tn in TENANTS}
            for j in running.values():
                want[j.tenant] += j.gpus
            waiting = set()
            for j in queued.values():
                want[j.tenant] += j.gpus
                waiting.add(j.tenant)
            share = water_fill({tn: min(w, QUOTA_GPUS) for tn, w in want.items()}, NODES * GPUS_PER_NODE)
            for tn in TENANTS:
                recv[tn] += held[tn]
                fair_s[tn] += share[tn] * STEP_S
            if len(waiting) == len(TENANTS):
                stats["all_queued_steps"] += 1
                for tn in TENANTS:
                    recv_all[tn] += held[tn]
        if nxt == len(jobs) and not running and not p.admit and not p.preempt:
            break  # what is left waits for something the replay will not bring (budget)
        if t > MAX_SIM_HOURS * HOUR:
            break
        t += STEP_S
    for j in list(running.values()):  # only at the hard stop
        stop(j, t, j.last_ckpt(t))
    out = summarise(jobs, stats, recv, fair_s, recv_all, report_budgets or budgets, t, time.perf_counter() - t0_wall)
    out["preemptors"] = len(rounds)
    out["preemptor_cycles"] = stats["preemptor_cycles"]
    out["preemptor_started_next_cycle"] = stats["preemptor_started_next"]
    out["most_preemption_cycles_of_one_job"] = max(rounds.values(), default=0)
    if diagnose and new:
        out["idle_gpu_hours_jobs_behind_a_reservation_would_fit"] = stats["held_back_gpu_s"] / HOUR
    out["idle_gpu_hours_while_jobs_wait"] = {k: round(v / HOUR, 1) for k, v in
                                             sorted(stats["idle_gpu_s"].items(), key=lambda kv: -kv[1])}
    if new:  # the incremental decayed usage against one full decayed_usage() over every attempt
        full = policy.decayed_usage(attempts, t, fair)
        decay = 2 ** (-(t - usage_t) / fair.half_life_s)
        inc = {k: v * decay for k, v in usage_done.items()}
        for k, v in policy.decayed_usage(ended, t, fair).items():
            inc[k] = inc.get(k, 0.0) + v
        out["usage_check_max_rel_err"] = max(abs(inc.get(k, 0.0) - v) / v for k, v in full.items() if v > 0)
    if stats["preemptions"] and new and not drain:
        out["same_decisions_newest_first_gpu_hours_lost"] = stats["cf_newest_gpu_s"] / HOUR
        out["same_decisions_own_choice_gpu_hours_lost"] = stats["cf_own_gpu_s"] / HOUR
    return out


def idle_cause(p, new: bool) -> str:
    """Why GPUs stay idle while jobs wait: the wait of the job holding the reservation (new policy),
    else the kinds of wait there are."""
    if not new:
        kinds = {str(w).split(":")[0].split(" ")[0] for w in p.waiting.values()}
        return "old: " + ", ".join(sorted(kinds))
    for w in p.waiting.values():
        if w.kind == "behind":
            reserved = p.waiting.get(w.reason.split()[1].rstrip(","))
            return f"reservation of a job waiting on {reserved.kind if reserved else 'start'}"
    return "no reservation: " + ", ".join(sorted({w.kind for w in p.waiting.values()}))


def counterfactual(p, queued: dict[str, SimJob], running: dict[str, SimJob], classes: dict, t: float,
                   stats: dict) -> None:
    """For each preemptor of plan `p`: the work its victims lose (killed now) against the work the old
    rule would lose freeing as many GPUs from the same candidates (lower classes, lowest class then
    newest first)."""
    def lost(j: SimJob) -> float:
        return (t - j.start - (j.last_ckpt(t) - j.saved)) * j.gpus

    taken: set[str] = set()
    for jid, wait in p.waiting.items():
        if wait.kind != "preempting":
            continue
        mine = wait.reason.removeprefix("preempting ").split(", ")
        taken.update(mine)
        freed = sum(running[v].gpus for v in mine)
        rank = classes[queued[jid].priority].rank
        cands = sorted((j for j in running.values() if classes[j.priority].rank < rank and j.id not in taken - set(mine)),
                       key=lambda j: (classes[j.priority].rank, -j.start, j.id))
        got = 0
        for j in cands:
            if got >= freed:
                break
            got += j.gpus
            stats["cf_newest_gpu_s"] += lost(j)
        stats["cf_own_gpu_s"] += sum(lost(running[v]) for v in mine)


def summarise(jobs: list[SimJob], stats: dict, recv: dict, fair_s: dict, recv_all: dict,
              budgets: dict[str, float], t_end: float, wall_s: float) -> dict:
    gpus = NODES * GPUS_PER_NODE
    done = [j for j in jobs if j.done_at is not None]
    first = min(j.submit for j in jobs)
    last = max((j.done_at for j in done), default=first)
    used = sum(j.used_gpu_s for j in jobs)
    waits = {}
    for cls in ("low", "normal", "high"):
        w = [(j.first_start - j.submit) / 60 for j in jobs if j.priority == cls and j.first_start is not None]
        waits[cls] = {"p50_min": pct(w, 50), "p95_min": pct(w, 95), "started": len(w),
                      "never_started": sum(1 for j in jobs if j.priority == cls and j.first_start is None)}
    ratio = {tn: recv[tn] / fair_s[tn] for tn in TENANTS if fair_s[tn] > 0}
    out = {
        "jobs": len(jobs), "finished": len(done), "rejected": sum(j.rejected for j in jobs),
        "unfinished": len(jobs) - len(done) - sum(j.rejected for j in jobs),
        "hard_stop": t_end > MAX_SIM_HOURS * HOUR,
        "makespan_h": (last - first) / HOUR,
        "utilisation_contended": stats["contended_gpu_s"] / (stats["contended_steps"] * STEP_S * gpus)
        if stats["contended_steps"] else None,
        # The same less the work later lost to preemption (counted as if all of it ran while jobs waited).
        "utilisation_contended_less_lost": (stats["contended_gpu_s"] - stats["lost_gpu_s"])
        / (stats["contended_steps"] * STEP_S * gpus) if stats["contended_steps"] else None,
        "contended_h": stats["contended_steps"] * STEP_S / HOUR,
        "utilisation_makespan": used / (gpus * (last - first)) if last > first else None,
        "utilisation_makespan_less_lost": (used - stats["lost_gpu_s"]) / (gpus * (last - first))
        if last > first else None,
        "wait_by_class": waits,
        "jain_maxmin": jain(list(ratio.values())),
        "received_over_fair_share": {tn: round(x, 3) for tn, x in ratio.items()},
        "jain_all_queued": jain(list(recv_all.values())) if stats["all_queued_steps"] else None,
        "all_queued_h": stats["all_queued_steps"] * STEP_S / HOUR,
        "preemptions": stats["preemptions"],
        "gpu_hours_lost": stats["lost_gpu_s"] / HOUR,
        "gpu_min_lost_per_preemption": stats["lost_gpu_s"] / 60 / stats["preemptions"] if stats["preemptions"] else 0.0,
        "gpu_hours_used": used / HOUR,
        "backfilled": stats["backfilled"],
        "plan_calls": stats["plan_calls"], "plan_ms_mean": 1000 * stats["plan_s"] / max(1, stats["plan_calls"]),
        "replay_wall_s": wall_s,
    }
    if budgets:
        out["budgets"] = {}
        for tenant, usd in budgets.items():
            mine = [j for j in jobs if j.tenant == tenant]
            ran = [j for j in mine if j.first_start is not None]
            spend = sum(j.used_gpu_s for j in mine) / HOUR * PRICE_PER_GPU_HOUR
            # A job's forecast error: what it cost (every attempt, lost work included) less its forecast upper bound.
            err = max((j.used_gpu_s / HOUR * PRICE_PER_GPU_HOUR - j.gpus * j.hi_s / HOUR * PRICE_PER_GPU_HOUR
                       for j in ran), default=0.0)
            out["budgets"][tenant] = {"budget_usd": usd, "spend_usd": round(spend, 2), "over_usd": round(spend - usd, 2),
                                      "largest_job_forecast_error_usd": round(max(0.0, err), 2),
                                      "jobs": len(mine), "ran": len(ran),
                                      "rejected": sum(j.rejected for j in mine),
                                      "unfinished": sum(1 for j in mine if j.done_at is None and not j.rejected)}
    return out


def trace_info(trace: list[SimJob], seed: int) -> dict:
    gpu_h = {tn: sum(j.gpus * j.work_s for j in trace if j.tenant == tn) / HOUR for tn in TENANTS}
    work = sorted(j.work_s / HOUR for j in trace)
    return {"seed": seed, "jobs": len(trace), "gpus": NODES * GPUS_PER_NODE, "step_s": STEP_S,
            "submit_hours": SUBMIT_HOURS, "offered_load": sum(gpu_h.values()) / (NODES * GPUS_PER_NODE * SUBMIT_HOURS),
            "run_h": {"p50": pct(work, 50), "p95": pct(work, 95), "max": work[-1]},
            "jobs_by_tenant": {tn: sum(j.tenant == tn for j in trace) for tn in TENANTS},
            "gpu_hours_by_tenant": {tn: round(v, 1) for tn, v in gpu_h.items()},
            "patterns": TENANTS,
            "jobs_by_class": {c: sum(j.priority == c for j in trace) for c in ("low", "normal", "high")},
            "jobs_by_gpus": {g: sum(j.gpus == g for j in trace) for g in (1, 2, 4, 8)},
            "actual_within_forecast_interval": sum(j.lo_s <= j.work_s <= j.hi_s for j in trace) / len(trace),
            "aging_s": AGING_S, "high_preempt_after_s": PREEMPT_AFTER_S, "quota_gpus": QUOTA_GPUS,
            "half_life_s": policy.FairShare().half_life_s}


def replay_line(name: str, r: dict) -> None:
    w = r["wait_by_class"]
    print(f"  {name:28} util {r['utilisation_contended']:.3f}  Jain {r['jain_maxmin']:.3f}  "
          f"preemptions {r['preemptions']:5}  lost {r['gpu_hours_lost']:7.1f} GPU-h  wait p50/p95 min "
          + "  ".join(f"{c} {w[c]['p50_min']:.0f}/{w[c]['p95_min']:.0f}" for c in ("high", "normal", "low"))
          + f"  ({r['replay_wall_s']:.1f} s)", flush=True)


SEED, MORE_SEEDS = 17, (18, 19, 20, 21)


def replay_bench() -> dict:
    trace = make_trace(SEED)
    budgets = budgets_for(trace)
    out = {"trace": trace_info(trace, SEED), "budgets_usd": budgets}
    print(f"  {len(trace)} jobs of {len(TENANTS)} tenants over {SUBMIT_HOURS:g} h, offered load "
          f"{out['trace']['offered_load']:.2f} x {NODES * GPUS_PER_NODE} GPUs", flush=True)
    for name, kw in (("before", {"new": False}), ("after", {"new": True, "diagnose": True}),
                     ("after_drain", {"new": True, "drain": True})):
        out[name] = replay(trace, report_budgets=budgets, **kw)
        replay_line(name, out[name])
    print(f"(d) budgets of {', '.join(f'{t} ${b:,.0f}' for t, b in budgets.items())}, "
          f"${PRICE_PER_GPU_HOUR}/GPU-hour", flush=True)
    for name, kw in (("after_budgets", {}), ("after_budgets_metered_only", {"commit_running": False})):
        out[name] = replay(trace, new=True, budgets=budgets, **kw)
        print(f"  {name:28} " + "  ".join(f"{t} ${b['spend_usd']:,.0f} ({b['over_usd']:+,.0f}; largest job error "
                                            f"${b['largest_job_forecast_error_usd']:,.0f})"
                                            for t, b in out[name]["budgets"].items()), flush=True)
    print("(e) sensitivity: aging_s 3600, high preempts after 600 s", flush=True)
    for name, new in (("before_aging3600_preempt600", False), ("after_aging3600_preempt600", True)):
        out[name] = replay(trace, new=new, aging_s=3600.0, preempt_after_s=600.0)
        replay_line(name, out[name])
    print(f"(f) other traces: seeds {', '.join(map(str, MORE_SEEDS))}", flush=True)
    out["seeds"] = {}
    for seed in MORE_SEEDS:
        trace = make_trace(seed)
        runs = {name: replay(trace, **kw) for name, kw in
                (("before", {"new": False}), ("after", {"new": True}), ("after_drain", {"new": True, "drain": True}))}
        out["seeds"][seed] = {name: {k: r[k] for k in ("utilisation_contended", "jain_maxmin", "preemptions",
                                                      "gpu_hours_lost")} for name, r in runs.items()}
        out["seeds"][seed]["jobs"] = len(trace)
        print(f"  seed {seed}: " + "  ".join(f"{name} util {r['utilisation_contended']:.3f} Jain {r['jain_maxmin']:.3f} "
                                            f"lost {r['gpu_hours_lost']:.1f} GPU-h" for name, r in runs.items()),
              flush=True)
    return out


def goals(out: dict) -> list[dict]:
    """Each goal with its figure and PASS/FAIL, computed from the results."""
    res = []

    def goal(what: str, figure: str, ok: bool) -> None:
        res.append({"goal": what, "figure": figure, "pass": bool(ok)})

    c10k = out["policy_cohorts"]
    goal("plan() at 10,000 queued, 100 tenants in 10 cohorts, 1,000 GPUs: >= 10,000 decisions/s",
         f"{c10k['decisions_per_s']:,.0f}/s", c10k["decisions_per_s"] >= 10_000)
    p10k = out["policy"][10_000]
    goal("plan() at 10,000 queued, 20 tenants (sweep): >= 10,000 decisions/s",
         f"{p10k['decisions_per_s']:,.0f}/s", p10k["decisions_per_s"] >= 10_000)
    sim = out.get("replay")
    if sim:
        b, a, d = sim["before"], sim["after"], sim["after_drain"]
        for name, r in (("victim choice only", a), ("with drain", d)):
            ratio = r["gpu_hours_lost"] / b["gpu_hours_lost"] if b["gpu_hours_lost"] else None
            goal(f"work lost to preemption, new ({name}) <= 50% of before",
                 f"{r['gpu_hours_lost']:.2f} vs {b['gpu_hours_lost']:.2f} GPU-h"
                 + (f" ({ratio:.1%})" if ratio is not None else ""), ratio is not None and ratio <= 0.5)
        if "same_decisions_newest_first_gpu_hours_lost" in a:
            own, newest = a["same_decisions_own_choice_gpu_hours_lost"], a["same_decisions_newest_first_gpu_hours_lost"]
            goal("same preemption decisions (new policy's), its victims lose <= 50% of newest-first's",
                 f"{own:.2f} vs {newest:.2f} GPU-h over {a['preemptions']} preemptions",
                 newest > 0 and own <= 0.5 * newest)
        goal("Jain's index (max-min-normalised, equal weights), new >= 0.9",
             f"{a['jain_maxmin']:.3f} (before {b['jain_maxmin']:.3f})", a["jain_maxmin"] >= 0.9)
        for name, r in (("victim choice only", a), ("with drain", d)):
            goal(f"GPU utilisation while jobs wait, new ({name}) >= before",
                 f"{r['utilisation_contended']:.3f} vs {b['utilisation_contended']:.3f}",
                 r["utilisation_contended"] >= b["utilisation_contended"])
        seeds = {SEED: {k: sim[k] for k in ("before", "after", "after_drain")}, **sim["seeds"]}
        n = len(seeds)
        for name in ("after", "after_drain"):
            ok = [s["before"]["gpu_hours_lost"] > 0 and s[name]["gpu_hours_lost"] <= 0.5 * s["before"]["gpu_hours_lost"]
                  for s in seeds.values()]
            worst = max(s[name]["gpu_hours_lost"] / s["before"]["gpu_hours_lost"] for s in seeds.values()
                        if s["before"]["gpu_hours_lost"] > 0)
            goal(f"work lost, new ({name}) <= 50% of before, on each of {n} traces", f"{sum(ok)}/{n} (worst {worst:.1%})",
                 all(ok))
        jains = [s["after"]["jain_maxmin"] for s in seeds.values()]
        goal(f"Jain's index, new >= 0.9, on each of {n} traces", f"{sum(j >= 0.9 for j in jains)}/{n} "
             f"(lowest {min(jains):.3f})", min(jains) >= 0.9)
        for name in ("after", "after_drain"):
            d = [s[name]["utilisation_contended"] - s["before"]["utilisation_contended"] for s in seeds.values()]
            goal(f"utilisation while jobs wait, new ({name}) >= before, on each of {n} traces",
                 f"{sum(x >= 0 for x in d)}/{n} (worst {min(d):+.3f})", min(d) >= 0)
        for tenant, x in sim["after_budgets"]["budgets"].items():
            goal(f"budget {tenant}: spend - budget <= its largest single-job forecast error",
                 f"${x['spend_usd']:,.0f} of ${x['budget_usd']:,.0f} ({x['over_usd']:+,.0f}; error "
                 f"${x['largest_job_forecast_error_usd']:,.0f})",
                 x["over_usd"] <= x["largest_job_forecast_error_usd"])
    c = out.get("cluster")
    if c:
        goal("what the queue adds to free -> RUNNING, p50 <= 0.5 s", f"{c['queue_overhead_p50_s']:+.2f} s",
             c["queue_overhead_p50_s"] <= 0.5)
    return res


def rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def two_levels(obj: dict) -> str:
    """JSON with one line per entry of the first two levels."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            inner = ",\n".join(f"  {json.dumps(str(k2))}: {json.dumps(rounded(v2))}" for k2, v2 in v.items())
            lines.append(f" {json.dumps(k)}: {{\n{inner}\n }}")
        elif isinstance(v, list):
            inner = ",\n".join(f"  {json.dumps(rounded(x))}" for x in v)
            lines.append(f" {json.dumps(k)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(rounded(v))}")
    return "{\n" + ",\n".join(lines) + "\n}"


def compact(out: dict) -> dict:
    """The figures the summary prints, as JSON."""
    keys = ("utilisation_contended", "utilisation_makespan", "jain_maxmin", "jain_all_queued", "all_queued_h",
            "preemptions", "gpu_hours_lost", "gpu_min_lost_per_preemption", "backfilled", "finished", "unfinished",
            "rejected", "makespan_h", "preemptor_cycles", "preemptor_started_next_cycle",
            "most_preemption_cycles_of_one_job", "same_decisions_newest_first_gpu_hours_lost",
            "idle_gpu_hours_jobs_behind_a_reservation_would_fit")
    sim = out.get("replay") or {}
    runs = {name: {**{k: r[k] for k in keys if k in r},
                   "wait_p50_p95_min": {c: [w["p50_min"], w["p95_min"]] for c, w in r["wait_by_class"].items()}}
            for name, r in sim.items() if isinstance(r, dict) and "wait_by_class" in r}
    budgets = {name: sim[name]["budgets"] for name in ("before", "after_budgets", "after_budgets_metered_only")
               if name in sim}
    return {"policy_10k_cohorts_decisions_per_s": out["policy_cohorts"]["decisions_per_s"], "replay": runs,
            "budgets": budgets, "seeds": sim.get("seeds", {}), "goals": out["goals"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-only", action="store_true", help="(a), (c)-(e) only: no Ray, no local cluster")
    args = ap.parse_args()
    out = {"policy": None, "policy_cohorts": None, "replay": None, "cluster": None}
    print("(a) policy.plan on simulated queues, 1,000 GPUs", flush=True)
    out["policy"] = policy_bench()
    out["policy_cohorts"] = cohort_bench()
    print(f"(c) replay of a synthetic trace, old policy (e2c6174) and new, {NODES * GPUS_PER_NODE} GPUs", flush=True)
    out["replay"] = replay_bench()
    if not args.sim_only:
        from ray_apps import cluster

        print("(b) local cluster, probe jobs needing both GPUs", flush=True)
        with tempfile.TemporaryDirectory(prefix="oppen-sched-") as tmp:
            settings = start_platform(Path(tmp))
            try:
                out["cluster"] = cluster_bench(settings)
            finally:
                cluster.down(settings, say=lambda s: None)
        print(json.dumps(out["cluster"], indent=1))
    out["goals"] = goals(out)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "scheduler.json").write_text(json.dumps(out, indent=2))
    print(two_levels(compact(out)))
    print("\nsummary")
    for g in out["goals"]:
        print(f"  {'PASS' if g['pass'] else 'FAIL'}  {g['goal']}: {g['figure']}")
    c = out["cluster"]
    if c:
        print(f"  free -> next RUNNING via the queue: p50 {c['queue_free_to_running_s']['p50']:.2f} s, "
              f"p95 {c['queue_free_to_running_s']['p95']:.2f} s; raw submit -> RUNNING: p50 "
              f"{c['raw_submit_to_running_s']['p50']:.2f} s")


if __name__ == "__main__":
    main()
