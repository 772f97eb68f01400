import pytest

from trainers.pricing import Allocation, CatalogError, load_catalog, parse_catalog

CATALOG = {"cpu_core_hour": 0.05, "memory_gib_hour": 0.01, "default_gpu": "generic",
           "gpus": {"generic": {"on_demand_hour": 0.25, "spot_hour": 0.10}, "big": {"on_demand_hour": 3.0}}}


def test_cost_is_allocation_times_rate_times_time():
    cat = parse_catalog(CATALOG)
    alloc = Allocation.for_workers(2, cpus_per_worker=3, gpus_per_worker=1)  # 6 CPUs, 2 GPUs
    cost = cat.cost(alloc, seconds=1800)
    assert cost.cpu_usd == pytest.approx(6 * 0.05 * 0.5)
    assert cost.gpu_usd == pytest.approx(2 * 0.25 * 0.5)
    assert cost.total_usd == pytest.approx(0.15 + 0.25)
    assert cost.as_metrics()["cost_usd"] == pytest.approx(cost.total_usd)
    assert cat.hourly_usd(alloc) == pytest.approx(6 * 0.05 + 2 * 0.25)


def test_spot_and_named_gpu_and_memory():
    cat = parse_catalog(CATALOG)
    assert cat.cost(Allocation(cpus=0, gpus=1), 3600, spot=True).gpu_usd == pytest.approx(0.10)
    # No spot price: spot falls back to on-demand rather than pretending it is free.
    assert cat.cost(Allocation(cpus=0, gpus=1, gpu_type="big"), 3600, spot=True).gpu_usd == pytest.approx(3.0)
    assert cat.cost(Allocation(cpus=0, memory_gib=10), 3600).memory_usd == pytest.approx(0.1)


def test_project_catalog_has_the_seed_rates():
    cat = load_catalog()
    assert cat.cpu_core_hour == 0.05
    assert cat.gpu().on_demand_hour == 0.25


@pytest.mark.parametrize("patch,match", [
    ({"cpu_core_hour": -1}, r"cpu_core_hour.*>= 0.*To fix"),
    ({"cpu_core_hour": None}, r"cpu_core_hour"),
    ({"gpus": {"generic": {"spot_hour": 0.1}}}, r"gpus\.generic\.on_demand_hour"),
    ({"gpus": {"generic": {"on_demand_hour": "cheap"}}}, r"gpus\.generic\.on_demand_hour.*'cheap'"),
    ({"default_gpu": "h900"}, r"no price for GPU type 'h900'"),
])
def test_invalid_catalog_names_the_entry(patch, match):
    with pytest.raises(CatalogError, match=match):
        parse_catalog({**CATALOG, **patch}, source="costs.yaml")


def test_unknown_gpu_type_and_bad_time():
    cat = parse_catalog(CATALOG)
    with pytest.raises(CatalogError, match="Known types: big, generic"):
        cat.cost(Allocation(cpus=1, gpus=1, gpu_type="tpu"), 10)
    with pytest.raises(ValueError):
        cat.cost(Allocation(cpus=1), -5)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(CatalogError, match="OPPEN_COSTS_FILE"):
        load_catalog(tmp_path / "nope.yaml")
