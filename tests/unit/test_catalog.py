"""The trainer catalog is the one place that defines a trainer: what it takes (typed, bounded),
whether users may start, tune or have it served, and the words people call it by. Everything
else reads these from the catalog."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import yaml

from tests.conftest import ROOT
from trainers.specs import (
    TRAINERS,
    SpecError,
    bounds_of,
    build_config,
    entry_for,
    router_phrases,
    router_words,
    servable,
    trainer_for_word,
    tunable,
    user_trainers,
    widest_bounds,
)


def test_users_start_the_real_workloads_not_the_internal_probe():
    assert user_trainers() == ("mnist", "llm")
    assert "probe" in TRAINERS and "probe" not in user_trainers()
    assert set(tunable()) <= set(user_trainers()) and set(servable()) <= set(user_trainers())


def test_tunable_and_servable_trainers_say_how():
    assert tunable() == ("mnist", "llm") and servable() == ("mnist", "llm")
    assert {name: entry_for(name).endpoint for name in servable()} == {"mnist": "predict", "llm": "generate"}
    assert not entry_for("probe").tunable and not entry_for("probe").servable


def test_the_readers_use_the_catalog():
    from ray_apps.agent import tools
    from ray_apps.serve import model_app
    from trainers import tune

    assert tools.USER_TRAINERS == user_trainers()
    assert tune.TUNABLE == tunable() and set(tune.DEFAULT_SPACES) == set(tunable())
    assert model_app.ENDPOINTS == {name: entry_for(name).endpoint for name in servable()}


def test_every_router_word_names_a_user_trainer_and_routes_to_it():
    from ray_apps.agent.router import extract, normalise

    words = {**router_words(), **router_phrases()}
    assert set(words.values()) == set(user_trainers())
    for name in user_trainers():
        assert trainer_for_word(name) == name  # a trainer's own name is one of its words
    for word, name in words.items():
        assert extract(normalise(f"train the {word} please"))["trainer"] == name, word
    assert trainer_for_word("probe") is None and trainer_for_word("resnet") is None


@pytest.mark.parametrize("trainer", tunable())
def test_every_default_search_space_parses_and_samples_valid_configs(trainer):
    from trainers.tune import DEFAULT_SPACES, parse_space, sample_configs

    space = parse_space(trainer, DEFAULT_SPACES[trainer])
    assert {d.name for d in space} <= {f.name for f in dataclasses.fields(TRAINERS[trainer])}
    configs = sample_configs(trainer, space, {}, 16, seed=0)  # each one built (validated) by the catalog
    assert len(configs) == 16 and all(set(c) == {d.name for d in space} for c in configs)


def test_a_tune_report_count_is_the_configs_own():
    import importlib

    assert build_config("mnist", {"epochs": 3}).tune_reports() == 3
    assert build_config("llm", {"max_steps": 120, "eval_every": 50}).tune_reports() == 3
    for name in tunable():  # what trainers.tune asks of a tunable trainer
        assert build_config(name, {}).tune_reports() >= 1
        assert callable(importlib.import_module(f"trainers.{name}").prepare_trials)


def _just_outside(meta: dict):
    """A value each bound refuses, per bound key."""
    return {"ge": meta.get("ge", 0) - 1, "gt": meta.get("gt", 0), "le": meta.get("le", 0) + 1,
            "lt": meta.get("lt", 0)}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_each_bound_in_the_metadata_is_checked_and_names_the_flag(trainer):
    checked = 0
    for f in dataclasses.fields(TRAINERS[trainer]):
        flag = f"--{f.name.replace('_', '-')}"
        outside = _just_outside(f.metadata)
        for key in bounds_of(f):
            with pytest.raises(SpecError, match=f"^{flag} must be"):
                build_config(trainer, {f.name: outside[key]})
            checked += 1
        if "choices" in f.metadata:
            with pytest.raises(SpecError, match=f"^{flag} must be one of"):
                build_config(trainer, {f.name: "nope"})
            checked += 1
        if bounds_of(f) or "choices" in f.metadata:
            build_config(trainer, {f.name: f.default})  # the default is inside its own bounds
    assert checked >= 3


def test_the_messages_say_the_range():
    for trainer, params, message in (
            ("probe", {"seconds": -1}, "--seconds must be in [0, 86400], got -1.0"),
            ("mnist", {"cpus_per_worker": 0.5}, "--cpus-per-worker must be at least 1 (a worker takes whole cores)"),
            ("mnist", {"num_workers": 2000}, "--num-workers must be in [1, 1024], got 2000"),
            ("mnist", {"lr": 0}, "--lr must be in (0, 10], got 0.0"),
            ("llm", {"lr": 2}, "--lr must be in (0, 1], got 2.0"),
            ("llm", {"weight_decay": 1}, "--weight-decay must be in [0, 1), got 1.0"),
            ("llm", {"warmup_steps": -1}, "--warmup-steps must be at least 0, got -1")):
        with pytest.raises(SpecError) as err:
            build_config(trainer, params)
        assert str(err.value).startswith(message)


def test_the_routers_number_limits_agree_with_the_catalog():
    """The router refuses an out-of-range number before any tool runs: where the catalog bounds a
    side, the router's limit is the widest of the user trainers' bounds there."""
    from ray_apps.agent.router import LIMITS

    for name, (low, high, _whole, open_low) in LIMITS.items():
        fields = [f for t in user_trainers() for f in dataclasses.fields(TRAINERS[t]) if f.name == name]
        bounds = widest_bounds(fields) if fields else {}
        if bounds.keys() & {"ge", "gt"}:
            assert (low, open_low) == (bounds.get("ge", bounds.get("gt")), "gt" in bounds), name
        if bounds.keys() & {"le", "lt"}:
            assert high == bounds.get("le", bounds.get("lt")), name


# --------------------------------------------------------------------------- the agent's tool schemas


@pytest.fixture()
def tools(tmp_path):
    from ray_apps.agent.tools import PlatformTools
    from ray_apps.config import Settings

    return PlatformTools(Settings(data_dir=tmp_path / "data"))  # refusals come before the queue is built


def test_the_queue_tools_schema_lists_types_and_bounds(tools):
    schema = tools.catalog()["queue_training_job"].schema()["function"]["parameters"]
    props = schema["$defs"]["TrainerParams"]["properties"]
    assert schema["properties"]["trainer"]["enum"] == list(user_trainers())
    assert props["epochs"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert props["num_workers"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1024}
    assert props["gpus_per_worker"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 64}
    assert props["weight_decay"]["anyOf"][0] == {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    assert props["precision"]["anyOf"][0]["enum"] == ["auto", "bf16", "fp16", "fp32"]
    # Every side the catalog bounds for a user trainer's field is bounded in the schema (by the widest
    # of the trainers' bounds where they differ).
    for name in user_trainers():
        for f in dataclasses.fields(TRAINERS[name]):
            typed, bounds = props[f.name]["anyOf"][0], bounds_of(f)
            if bounds.keys() & {"ge", "gt"}:
                low = bounds.get("ge", bounds.get("gt"))
                assert any(typed.get(k, low + 1) <= low for k in ("minimum", "exclusiveMinimum")), f.name
            if bounds.keys() & {"le", "lt"}:
                high = bounds.get("le", bounds.get("lt"))
                assert any(typed.get(k, high - 1) >= high for k in ("maximum", "exclusiveMaximum")), f.name


@pytest.mark.parametrize("params,field", [
    ({"epochs": 0}, "params.epochs"),
    ({"num_workers": 5000}, "params.num_workers"),
    ({"lr": -1.0}, "params.lr"),
    ({"model": "gpt-5"}, "params.model"),
])
def test_a_value_out_of_bounds_is_refused_by_the_tool_naming_the_field(tools, params, field):
    from ray_apps.agent.tools import ToolError

    with pytest.raises(ToolError, match=f"bad arguments for queue_training_job: {field}: "):
        tools.call("queue_training_job", {"trainer": "llm", "params": params})


def test_a_trainers_own_narrower_bound_is_checked_by_the_catalog(tools):
    from trainers.specs import SpecError

    # lr up to 10 passes the schema (mnist takes it) but not the LLM's own bound.
    with pytest.raises(SpecError, match=r"--lr must be in \(0, 1\]") as err:
        tools.call("validate_job_resources", {"trainer": "llm", "params": {"lr": 5}})
    assert err.value.field == "params.lr"


def test_an_unknown_argument_is_refused_by_name(tools):
    from ray_apps.agent.tools import ToolError

    with pytest.raises(ToolError, match="params.gpu_count: Extra inputs are not permitted"):
        tools.call("queue_training_job", {"trainer": "mnist", "params": {"gpu_count": 8}})
    with pytest.raises(ToolError, match="colour: Extra inputs are not permitted"):
        tools.call("queue_training_job", {"trainer": "mnist", "colour": "red"})


# --------------------------------------------------------------------------- no other definitions


def test_serving_replicas_that_stay_up_are_the_ones_the_catalog_says():
    from ray_apps.serve.served_models import LlmModel, MnistModel

    deployments = {d["name"]: d for app in yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())["applications"]
                   for d in app.get("deployments", [])}
    served = {d.func_or_class.name: deployments[d.name] for d in (MnistModel, LlmModel)}
    assert set(served) == set(servable())
    for name, deployment in served.items():
        stays_up = deployment.get("autoscaling_config", {}).get("min_replicas", 1) >= 1
        assert entry_for(name).stays_loaded == stays_up, name


# Modules that may name a trainer: the catalog, the trainer's own module, and the serving classes
# that load a specific trainer's model.
MAY_NAME_TRAINERS = {"trainers/specs.py", "ray_apps/serve/served_models.py",
                     # the built-in dataset `builtin:mnist` shares the word with its trainer
                     "trainers/dataset_catalog.py",
                     *(f"trainers/{name}.py" for name in TRAINERS)}


def test_no_other_module_spells_a_trainer_name():
    """A string literal that is exactly a trainer's name, in platform code, outside the modules that
    define a trainer. Docstrings, comments and longer strings ("mnist.npz") do not count."""
    found = []
    for path in sorted([*ROOT.glob("ray_apps/**/*.py"), *ROOT.glob("trainers/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in MAY_NAME_TRAINERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Constant) and node.value in TRAINERS:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "ask trainers.specs instead:\n" + "\n".join(found)
