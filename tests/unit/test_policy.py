from ray_apps.scheduler.policy import (Gang, PolicyConfig, PriorityClass, QueuedJob, Quota, RunningJob, order,
                                       place, plan)

CLASSES = {"low": PriorityClass("low", 0), "normal": PriorityClass("normal", 1),
           "high": PriorityClass("high", 2, preempt_after_s=60)}
CFG = PolicyConfig(classes=CLASSES, aging_s=600)
ONE_GPU = Gang(workers=1, cpus_per_worker=1, gpus_per_worker=1)


def q(id, priority="normal", at=0.0, tenant="a", gang=ONE_GPU):
    return QueuedJob(id=id, tenant=tenant, priority=priority, submitted_at=at, gang=gang)


def r(id, priority="normal", at=0.0, tenant="a", gang=ONE_GPU):
    return RunningJob(id=id, tenant=tenant, priority=priority, started_at=at, gang=gang)


def test_priority_then_fifo():
    jobs = [q("n1", at=1), q("l1", "low", at=0), q("h1", "high", at=5), q("n0", at=0)]
    assert [j.id for j in order(jobs, CFG, now=10)] == ["h1", "n0", "n1", "l1"]


def test_aging_lifts_a_starved_low_job_above_newer_normal_ones():
    jobs = [q("old-low", "low", at=0), q("new-normal", at=1000)]
    assert order(jobs, CFG, now=1001)[0].id == "old-low"   # waited 1001 s > one rank (600 s) more
    assert order(jobs, CFG, now=500)[0].id == "new-normal"


def test_gang_admitted_only_whole():
    nodes = [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert place(Gang(2, 1, 1), nodes) is not None
    assert place(Gang(3, 1, 1), nodes) is None
    assert place(Gang(1, 1, 2), nodes) is None  # 2 GPUs free in all, but not on one node
    p = plan([q("big", gang=Gang(3, 1, 1)), q("small", "low")], [], nodes, CFG, now=0)
    assert p.admit == ["small"] and "big" in p.waiting


def test_a_job_that_could_never_pack_reserves_nothing():
    nodes = [{"CPU": 4, "GPU": 1}]
    jobs = [q("n-big", at=0, gang=Gang(1, 1, 2)), q("n-small", at=1), q("l-small", "low", at=2)]
    p = plan(jobs, [], nodes, CFG, now=3)
    assert p.admit == ["n-small"] and p.waiting["n-big"].kind == "packing"
    assert p.waiting["l-small"].kind == "behind" or p.waiting["l-small"].kind == "capacity"


def test_quota_caps_a_tenant_and_leaves_room_for_others():
    cfg = PolicyConfig(classes=CLASSES, quotas={"a": Quota(gpus=1)})
    nodes = [{"CPU": 8, "GPU": 4}]
    p = plan([q("a2", at=1), q("b1", at=2, tenant="b")], [r("a1")], nodes, cfg, now=3)
    assert p.admit == ["b1"] and p.waiting["a2"].kind == "quota"


def test_high_priority_preempts_newest_lower_job_after_waiting():
    nodes = [{"CPU": 2, "GPU": 0}]
    running = [r("old-low", "low", at=0), r("new-low", "low", at=50), r("normal", "normal", at=10)]
    early = plan([q("h", "high", at=100)], running, nodes, CFG, now=120)
    assert early.preempt == [] and early.admit == []
    late = plan([q("h", "high", at=100)], running, nodes, CFG, now=161)
    assert late.preempt == ["new-low"]


def test_preemption_never_hits_equal_or_higher_classes():
    nodes = [{"CPU": 2, "GPU": 0}]
    p = plan([q("h2", "high", at=0)], [r("h1", "high")], nodes, CFG, now=1000)
    assert p.preempt == [] and p.waiting["h2"].kind == "capacity"


def test_resources_freed_by_preemption_are_held_for_the_preemptor():
    nodes = [{"CPU": 4, "GPU": 1}]  # 1 GPU free now, the job needs 2
    running = [r("low1", "low", at=5)]
    jobs = [q("h", "high", at=0, gang=Gang(1, 1, 2)), q("l2", "low", at=1)]
    p = plan(jobs, running, nodes, CFG, now=100)
    assert p.preempt == ["low1"] and p.admit == []  # l2 may not take the GPU held for h


def test_ten_thousand_jobs_on_a_thousand_gpus():
    jobs = [q(f"j{i}", ("low", "normal", "high")[i % 3], at=i, tenant=f"t{i % 50}") for i in range(10_000)]
    nodes = [{"CPU": 64, "GPU": 8} for _ in range(125)]  # 1,000 GPUs
    p = plan(jobs, [], nodes, CFG, now=20_000)
    assert len(p.admit) == 1000 and len(p.admit) + len(p.waiting) == 10_000
    assert len(set(p.admit)) == 1000


def test_a_gang_that_fits_nodes_the_autoscaler_may_add_scales_instead_of_preempting():
    full = [{"CPU": 1, "GPU": 0}]          # the running low job holds the only GPU node's GPU
    gpu_node = {"CPU": 1, "GPU": 1}
    p = plan([q("h", "high", at=0)], [r("low-1", "low", at=1)], full, CFG, now=1000, addable=[gpu_node])
    assert p.scale_up == ["h"] and p.preempt == [] and p.admit == []
    assert p.waiting["h"].kind == "nodes"
    # The group at its maximum: nothing to add, so the old rule stands and the low job is stopped.
    p = plan([q("h", "high", at=0)], [r("low-1", "low", at=1)], full, CFG, now=1000, addable=[])
    assert p.preempt == ["low-1"] and p.scale_up == []


def test_nodes_counted_on_by_one_scaling_job_are_not_promised_to_the_next():
    two_gpus = Gang(workers=2, cpus_per_worker=1, gpus_per_worker=1)
    addable = [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    p = plan([q("a", at=0, gang=two_gpus), q("b", "low", at=1)], [], [], CFG, now=2, addable=addable)
    assert p.scale_up == ["a"]
    assert p.waiting["b"].kind == "capacity"  # both addable GPU nodes are a's
    # A gang may use what is free now and one new node together.
    p = plan([q("a", at=0, gang=two_gpus)], [], [{"CPU": 1, "GPU": 1}], CFG, now=1, addable=addable[:1])
    assert p.scale_up == ["a"]


def test_a_job_preempts_only_its_own_tenant_unless_its_class_may_cross_tenants():
    nodes = [{"CPU": 1, "GPU": 0}]
    theirs, mine = r("theirs", "low", at=2, tenant="b"), r("mine", "low", at=1, tenant="a")
    p = plan([q("h", "high", at=0, tenant="a")], [theirs, mine], nodes, CFG, now=1000)
    assert p.preempt == ["mine"]  # the newer low job is team b's: passed over
    p = plan([q("h", "high", at=0, tenant="a")], [theirs], nodes, CFG, now=1000)
    assert p.preempt == [] and "h" in p.waiting
    crossing = PolicyConfig(classes={**CLASSES, "high": PriorityClass("high", 2, 60, preempts_other_tenants=True)})
    assert plan([q("h", "high", at=0, tenant="a")], [theirs], nodes, crossing, now=1000).preempt == ["theirs"]


def test_a_tenant_uses_only_the_priority_classes_it_is_given(tmp_path):
    import pytest

    from ray_apps.config import SettingsError
    from ray_apps.scheduler.config import load_queue_config

    path = tmp_path / "queue.yaml"
    path.write_text("tenants:\n  team-b: {priorities: [normal, low]}\n")
    config = load_queue_config(path)
    assert config.allowed_priorities("team-b") == ["normal", "low"]
    assert config.allowed_priorities("team-a") == ["high", "normal", "low"]
    path.write_text("tenants:\n  team-b: {priorities: [urgent]}\n")
    with pytest.raises(SettingsError, match="team-b: unknown priorities urgent"):
        load_queue_config(path)
