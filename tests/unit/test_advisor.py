"""The advisor on crafted run histories: pure rules, then the same through a real MLflow store."""

import pytest

from ray_apps.costs.advisor import RunView, recommend
from trainers.pricing import parse_catalog

CATALOG = parse_catalog({"cpu_core_hour": 0.05, "default_gpu": "generic",
                         "gpus": {"generic": {"on_demand_hour": 0.25, "spot_hour": 0.10}}})


def view(run_id, *, workers=1, cpus=2, gpus=0, batch=128, acc=0.99, sps=1000.0, cost=1.0, history=None, **metrics):
    return RunView(run_id=run_id, trainer="mnist",
                   params={"num_workers": str(workers), "cpus_per_worker": str(cpus), "gpus_per_worker": str(gpus),
                           "batch_size": str(batch)},
                   metrics={"test_accuracy": acc, "samples_per_s": sps, "job_cost_usd": cost, **metrics},
                   history=history or {})


def advise(run, past=()):
    return recommend(run, list(past), CATALOG, metric="test_accuracy", higher_is_better=True)


def test_a_plateau_recommends_stopping_where_the_metric_stopped_moving():
    acc = {1: 0.970, 2: 0.9885, 3: 0.9890, 4: 0.9891, 5: 0.9890}
    cost = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0}
    recs = advise(view("r", history={"test_accuracy": acc, "cost_usd": cost}))
    assert [r.kind for r in recs] == ["plateau"]
    assert recs[0].evidence["stop_at"] == 2 and recs[0].saving_usd == pytest.approx(0.6)


def test_no_plateau_advice_while_the_metric_still_improves():
    acc = {1: 0.95, 2: 0.97, 3: 0.985, 4: 0.99}
    assert advise(view("r", history={"test_accuracy": acc, "cost_usd": {s: s / 4 for s in acc}})) == []


def test_more_workers_that_did_not_speed_up_recommend_fewer():
    run = view("r", workers=2, cpus=1, sps=1000.0, cost=1.0)
    one = [view("p1", workers=1, cpus=1, sps=950.0), view("p2", workers=1, cpus=1, sps=970.0)]
    recs = advise(run, one)
    assert recs[0].kind == "workers"
    # half the rate, 1000/960 of the time
    assert recs[0].saving_usd == pytest.approx(1.0 - 0.5 * 1000 / 960)
    # Workers that scaled linearly earn no such advice.
    assert advise(run, [view("p", workers=1, cpus=1, sps=500.0)]) == []


def test_a_faster_batch_size_with_the_same_accuracy_is_recommended():
    run = view("r", batch=64, acc=0.990, sps=800.0, cost=1.0)
    recs = advise(run, [view("fast", batch=256, acc=0.9895, sps=1600.0), view("worse", batch=512, acc=0.95,
                                                                                sps=3000.0)])
    assert [r.kind for r in recs] == ["batch_size"]
    assert recs[0].evidence["run_id"] == "fast" and recs[0].saving_usd == pytest.approx(0.5)


def test_spot_saving_for_gpu_runs_names_the_risk():
    recs = advise(view("r", gpus=1, job_cost_gpu_usd=2.5))
    assert recs[0].kind == "spot" and recs[0].saving_usd == pytest.approx(2.5 * (1 - 0.10 / 0.25))
    assert "reclaimed" in recs[0].message
    assert advise(view("cpu-only")) == []


def test_recommendations_from_crafted_runs_in_a_real_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from ray_apps.costs.runs import past_views, run_view

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("mnist")

    def crafted(workers, sps, accs, costs):
        run_id = client.create_run(exp, tags={"oppen.trainer": "mnist"}).info.run_id
        client.log_param(run_id, "num_workers", workers)
        client.log_param(run_id, "cpus_per_worker", 1)
        for step, (a, c) in enumerate(zip(accs, costs), 1):
            client.log_metric(run_id, "test_accuracy", a, step=step)
            client.log_metric(run_id, "cost_usd", c, step=step)
            client.log_metric(run_id, "samples_per_s", sps, step=step)
        client.set_terminated(run_id)
        return run_id

    crafted(1, 990.0, [0.98, 0.99], [0.1, 0.2])
    target = crafted(2, 1000.0, [0.98, 0.9895, 0.9897, 0.9898], [0.2, 0.4, 0.6, 0.8])
    run = run_view(client, target, "test_accuracy")
    recs = recommend(run, past_views(client, "mnist"), CATALOG, metric="test_accuracy", higher_is_better=True)
    kinds = {r.kind: r for r in recs}
    assert set(kinds) == {"plateau", "workers"}
    assert kinds["plateau"].saving_usd == pytest.approx(0.4)          # stop after unit 2 of 4
    assert kinds["workers"].saving_usd == pytest.approx(0.8 - 0.8 * 0.5 * 1000 / 990)
