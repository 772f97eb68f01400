"""The policy's sharing rules: cohorts, fair share with decay, budgets, checkpoint-aware preemption,
minimum runtime, the job cap, backfill and start estimates. Pure functions: no Ray, no clock."""

from __future__ import annotations

import pytest

from ray_apps.scheduler.policy import (Budget, FairShare, Gang, PolicyConfig, PriorityClass, QueuedJob, Quota,
                                       RunningJob, Spend, decayed_usage, estimate_starts, order, plan)

CLASSES = {"low": PriorityClass("low", 0), "normal": PriorityClass("normal", 1),
           "high": PriorityClass("high", 2, preempt_after_s=60)}
ONE_GPU = Gang(1, 1, 1)
CPU = Gang(1, 1, 0)


def q(id, priority="normal", at=0.0, tenant="a", gang=ONE_GPU, **kw):
    return QueuedJob(id=id, tenant=tenant, priority=priority, submitted_at=at, gang=gang, **kw)


def r(id, priority="normal", at=0.0, tenant="a", gang=ONE_GPU, **kw):
    return RunningJob(id=id, tenant=tenant, priority=priority, started_at=at, gang=gang, **kw)


def cohort_cfg(**a_kw) -> PolicyConfig:
    """Tenants a and b of cohort 'lab', 2 GPUs each nominal."""
    return PolicyConfig(classes=CLASSES, quotas={
        "a": Quota(cpus=8, gpus=2, cohort="lab", **a_kw), "b": Quota(cpus=8, gpus=2, cohort="lab")},
        reclaim_after_s=10)


# --------------------------------------------------------------------------- cohorts


def test_a_tenant_borrows_what_its_cohort_leaves_unused_up_to_its_limit():
    nodes = [{"CPU": 16, "GPU": 4}]
    running = [r("a1", tenant="a"), r("a2", tenant="a")]            # a at its nominal 2 GPUs
    p = plan([q("a3", tenant="a")], running, nodes, cohort_cfg(), now=1)
    assert p.admit == ["a3"]                                           # b's unused GPUs lent
    p = plan([q("a3", tenant="a")], running, nodes, cohort_cfg(borrow_gpus=0), now=1)
    assert p.admit == [] and p.waiting["a3"].kind == "quota"
    # Without a cohort the nominal quota is a hard cap, as before.
    alone = PolicyConfig(classes=CLASSES, quotas={"a": Quota(gpus=2)})
    assert plan([q("a3", tenant="a")], running, nodes, alone, now=1).waiting["a3"].kind == "quota"


def test_a_lender_lends_no_more_than_its_lending_limit():
    cfg = PolicyConfig(classes=CLASSES, quotas={
        "a": Quota(gpus=2, cohort="lab"), "b": Quota(gpus=2, cohort="lab", lend_gpus=1)})
    nodes = [{"CPU": 16, "GPU": 8}]
    running = [r("a1", tenant="a"), r("a2", tenant="a")]
    p = plan([q("a3", tenant="a", at=1), q("a4", tenant="a", at=2)], running, nodes, cfg, now=3)
    assert p.admit == ["a3"]
    assert p.waiting["a4"].kind == "cohort" and "no unused quota" in p.waiting["a4"].reason


def test_borrowed_resources_are_reclaimed_when_their_owner_needs_them():
    nodes = [{"CPU": 16, "GPU": 0}]                      # all 4 GPUs taken, 3 of them by a
    running = [r("a1", tenant="a", at=0), r("a2", tenant="a", at=5), r("a3", tenant="a", at=9, priority="high"),
               r("b1", tenant="b", at=0)]
    early = plan([q("b2", tenant="b", at=100, priority="low")], running, nodes, cohort_cfg(), now=105)
    assert early.preempt == []                           # waited 5 s < reclaim_after_s
    p = plan([q("b2", tenant="b", at=100, priority="low")], running, nodes, cohort_cfg(), now=111)
    # One of a's jobs past its nominal 2 GPUs is stopped, whatever its class: the one losing least.
    assert p.preempt == ["a3"] and p.waiting["b2"].kind == "preempting"
    # A tenant within its nominal quota is never reclaimed from.
    p = plan([q("b3", tenant="b", at=100, priority="low")], running[:2] + [r("b1", tenant="b")], nodes,
             cohort_cfg(), now=500)
    assert p.preempt == []


# --------------------------------------------------------------------------- fair share


def test_decayed_usage_halves_every_half_life():
    fair = FairShare(half_life_s=100, gpu_weight=8)
    recent = decayed_usage([("a", 990, 1000, 1, 0)], now=1000, fair=fair)["a"]
    old = decayed_usage([("a", 890, 900, 1, 0)], now=1000, fair=fair)["a"]
    assert recent == pytest.approx(10, rel=0.05) and old == pytest.approx(recent / 2, rel=1e-6)
    gpu = decayed_usage([("a", 990, 1000, 0, 1)], now=1000, fair=fair)["a"]
    assert gpu == pytest.approx(8 * recent)


def test_within_a_class_the_least_served_tenant_goes_first_and_tenants_interleave():
    cfg = PolicyConfig(classes=CLASSES)
    jobs = [q(f"a{i}", tenant="a", at=i) for i in range(3)] + [q(f"b{i}", tenant="b", at=10 + i) for i in range(3)]
    heavy_a = {"a": 1e8, "b": 0.0}  # ~115 weighted CPUs held on average lately
    assert [j.id for j in order(jobs, cfg, now=20, usage=heavy_a)][:3] == ["b0", "b1", "b2"]
    assert [j.id for j in order(jobs, cfg, now=20)] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    # Weights: b's share is twice a's, so b gets two turns to a's one.
    weighted = PolicyConfig(classes=CLASSES, quotas={"b": Quota(weight=2)})
    assert [j.id for j in order(jobs, weighted, now=20)][:3] == ["a0", "b0", "b1"]
    # Classes and aging stay above fair share.
    assert order(jobs + [q("h", "high", tenant="a", at=19)], cfg, now=20, usage=heavy_a)[0].id == "h"


# --------------------------------------------------------------------------- budgets


def test_budget_makes_a_job_wait_or_refuses_one_that_alone_exceeds_it():
    cfg = PolicyConfig(classes=CLASSES, budgets={"a": Budget(usd=10)})
    nodes = [{"CPU": 8, "GPU": 4}]
    jobs = [q("fits", at=0, cost_usd=3), q("over", at=1, cost_usd=4), q("huge", at=2, cost_usd=11),
            q("unforecast", at=3)]
    p = plan(jobs, [], nodes, cfg, now=5, spend={"a": Spend(usd=4)})
    assert p.admit == ["fits"]                            # 4 + 3 <= 10; then 7 + 4 > 10
    assert p.waiting["over"].kind == "budget" and "$7.0000" in p.waiting["over"].reason
    assert "alone exceeds" in p.reject["huge"]
    assert p.waiting["unforecast"].kind == "budget"
    # An admin's override lets a job past; another tenant is unaffected.
    p = plan([q("over", cost_usd=4, over_budget=True), q("b", tenant="b")], [], nodes, cfg, now=5,
             spend={"a": Spend(usd=9)})
    assert sorted(p.admit) == ["b", "over"]


def test_gpu_hour_budget_counts_gpus_times_forecast_hours():
    cfg = PolicyConfig(classes=CLASSES, budgets={"a": Budget(gpu_hours=2)})
    nodes = [{"CPU": 8, "GPU": 4}]
    p = plan([q("two-gpus-half-hour", gang=Gang(2, 1, 1), run_s=1800), q("next", at=1, run_s=3600)],
             [], nodes, cfg, now=2, spend={"a": Spend(gpu_hours=0.5)})
    assert p.admit == ["two-gpus-half-hour"] and p.waiting["next"].kind == "budget"
    assert plan([q("cpu-only", gang=CPU)], [], nodes, cfg, now=2, spend={"a": Spend(gpu_hours=5)}).admit == \
        ["cpu-only"]


# --------------------------------------------------------------------------- preemption


def test_victims_are_the_jobs_that_lose_least_since_their_checkpoint():
    nodes = [{"CPU": 4, "GPU": 0}]
    running = [r("newest", "low", at=90),                          # no checkpoint: 110 s lost
               r("old-ckpt", "low", at=0, checkpoint_at=195),      # 5 s lost
               r("mid", "low", at=50, checkpoint_at=100)]          # 100 s lost
    p = plan([q("h", "high", at=0)], running, nodes, PolicyConfig(classes=CLASSES), now=200)
    assert p.preempt == ["old-ckpt"]                      # newest-first would have taken 'newest'
    assert p.lost["old-ckpt"] == (pytest.approx(5.0), pytest.approx(5.0))
    # A two-GPU job needs two victims: the cheapest pair, not the newest.
    p = plan([q("h", "high", at=0, gang=Gang(2, 1, 1))], running, nodes, PolicyConfig(classes=CLASSES), now=200)
    assert sorted(p.preempt) == ["mid", "old-ckpt"]


def test_a_job_inside_its_minimum_runtime_is_never_a_victim():
    classes = {**CLASSES, "low": PriorityClass("low", 0, min_runtime_s=300)}
    nodes = [{"CPU": 4, "GPU": 0}]
    running = [r("young", "low", at=100, checkpoint_at=190)]
    cfg = PolicyConfig(classes=classes)
    assert plan([q("h", "high", at=0)], running, nodes, cfg, now=200).preempt == []
    assert plan([q("h", "high", at=0)], running, nodes, cfg, now=401).preempt == ["young"]


# --------------------------------------------------------------------------- cap and backfill


def test_no_more_jobs_go_to_ray_than_the_cap():
    cfg = PolicyConfig(classes=CLASSES, max_running_jobs=3)
    nodes = [{"CPU": 64, "GPU": 8}]
    p = plan([q(f"j{i}", at=i, gang=CPU) for i in range(5)], [r("x", gang=CPU)], nodes, cfg, now=9)
    assert p.admit == ["j0", "j1"] and p.waiting["j2"].kind == "cap"
    assert plan([q("j", gang=CPU)], [], nodes, cfg, now=1, active_jobs=3).admit == []


def test_backfill_starts_a_short_job_only_if_it_ends_before_the_reserved_job_starts():
    nodes = [{"CPU": 2, "GPU": 2}]                        # 2 GPUs free, 2 more held until t=1000
    running = [r("r1", gang=Gang(2, 1, 1), ends_at=1000)]
    big = q("big", at=0, gang=Gang(4, 1, 1))              # needs all 4 GPUs: reserved for t=1000
    short = q("short", at=1, run_s=500)                   # ends at 600 < 1000: backfilled
    long = q("long", at=2, run_s=5000)                    # would still hold a GPU at 1000: waits
    unknown = q("unknown", at=3)                          # no forecast: cannot be shown to end in time
    p = plan([big, short, long, unknown], running, nodes, PolicyConfig(classes=CLASSES), now=100)
    assert p.admit == ["short"] and p.backfilled == ["short"]
    assert p.waiting["big"].kind == "capacity"
    assert p.waiting["long"].kind == "behind" and "big" in p.waiting["long"].reason
    assert p.waiting["unknown"].kind == "behind"


def test_backfill_never_delays_the_reserved_job():
    """Whatever the short jobs, every admitted one ends before the reserved job's shadow time or
    fits what the reserved job leaves over: replayed over many random queues."""
    import random

    rng = random.Random(7)
    cfg = PolicyConfig(classes=CLASSES)
    for _ in range(300):
        total_gpus = rng.randint(2, 8)
        running = [r(f"r{i}", gang=Gang(1, 1, 1), ends_at=rng.uniform(50, 2000)) for i in range(total_gpus - 1)]
        nodes = [{"CPU": 64, "GPU": 1.0}]
        head = q("head", at=0, gang=Gang(total_gpus, 1, 1))
        rest = [q(f"s{i}", at=1 + i, run_s=rng.choice([None, rng.uniform(10, 3000)]),
                  gang=rng.choice([ONE_GPU, CPU])) for i in range(6)]
        p = plan([head, *rest], running, nodes, cfg, now=0)
        shadow = max(j.ends_at for j in running)          # the head needs every GPU
        by_id = {j.id: j for j in rest}
        gpus_started = [by_id[i] for i in p.admit if by_id[i].gang.gpus]
        assert "head" not in p.admit
        for job in gpus_started:                            # any GPU job admitted ends before the shadow
            assert job.run_s is not None and job.run_s <= shadow


def test_start_estimates_follow_running_jobs_forecast_ends():
    running = [(Gang(1, 1, 1), 100.0), (Gang(1, 1, 1), 300.0)]
    jobs = [q("first", at=0, run_s=50), q("second", at=1, gang=Gang(2, 1, 1), run_s=10), q("third", at=2)]
    est = estimate_starts(jobs, running, [{"CPU": 4, "GPU": 0}], now=0)
    assert est["first"] == 100 and est["second"] == 300 and est["third"] == 310
    # A running job of unknown end leaves what waits on it unknown.
    est = estimate_starts(jobs, [(Gang(1, 1, 1), None), (Gang(1, 1, 1), 300.0)], [{"CPU": 4, "GPU": 0}], now=0)
    assert est["first"] == 300 and est["second"] is None and est["third"] is None


def test_ten_thousand_jobs_a_hundred_tenants_ten_cohorts_and_a_thousand_gpus():
    quotas = {f"t{i}": Quota(cpus=200, gpus=10, cohort=f"c{i % 10}", borrow_gpus=10) for i in range(100)}
    cfg = PolicyConfig(classes=CLASSES, quotas=quotas, budgets={f"t{i}": Budget(usd=1e6) for i in range(0, 100, 7)})
    jobs = [q(f"j{i}", ("low", "normal", "high")[i % 3], at=i, tenant=f"t{i % 100}",
              gang=Gang(1 + i % 4, 2, 1), run_s=600 + i % 1000, cost_usd=1.0) for i in range(10_000)]
    nodes = [{"CPU": 64, "GPU": 8} for _ in range(125)]
    p = plan(jobs, [], nodes, cfg, now=20_000, usage={f"t{i}": i * 1e5 for i in range(100)})
    assert len(p.admit) + len(p.waiting) + len(p.reject) == 10_000
    assert sum(jobs[int(i[1:])].gang.gpus for i in p.admit) <= 1000


def test_a_job_blocked_by_packing_reserves_from_the_next_end_not_from_now():
    nodes = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}]     # 8 GPUs free, but 4 per node
    running = [r("r1", gang=Gang(1, 1, 4), ends_at=7200), r("r2", gang=Gang(1, 1, 4), ends_at=7200)]
    big = q("big", at=0, gang=Gang(1, 1, 8))
    small = q("small", at=1, gang=Gang(1, 1, 2), run_s=600)
    p = plan([big, small], running, nodes, PolicyConfig(classes=CLASSES), now=0)
    assert p.waiting["big"].kind == "packing" and p.admit == ["small"] and p.backfilled == ["small"]


def test_jobs_behind_a_reservation_do_not_preempt():
    """What a preemptor behind a reservation freed would go to the reserved job first, and it would
    preempt again next cycle (benchmarks/scheduler.py measured the churn)."""
    cfg = PolicyConfig(classes=CLASSES, aging_s=100)
    nodes = [{"CPU": 0, "GPU": 0}]
    running = [r("low1", "low", at=0, gang=CPU, ends_at=10_000), r("n1", at=0, gang=CPU, ends_at=1500)]
    aged = q("aged-normal", "normal", at=0, gang=Gang(2, 1, 0))   # waited long: ordered before the high job
    high = q("h", "high", at=850, gang=CPU)
    p = plan([aged, high], running, nodes, cfg, now=1000)
    assert p.order == ["aged-normal", "h"] and p.waiting["aged-normal"].kind == "capacity"
    assert p.preempt == [] and p.waiting["h"].kind == "behind"
    # Without the reservation ahead of it, the same job preempts.
    assert plan([high], running, nodes, cfg, now=1000).preempt == ["low1"]
