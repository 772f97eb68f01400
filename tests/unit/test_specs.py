import argparse

import pytest

from trainers.specs import MnistConfig, SpecError, add_arguments, build_config, spec_for


def test_build_config_coerces_and_validates():
    cfg = build_config("mnist", {"epochs": "3", "lr": "0.01", "num_workers": 2, "gpus_per_worker": 1})
    assert (cfg.epochs, cfg.lr, cfg.total_gpus, cfg.total_cpus) == (3, 0.01, 2, 4)


@pytest.mark.parametrize("params,match", [
    ({"epochs": -1}, "--epochs must be at least 1, got -1"),
    ({"epochs": 1.5}, "--epochs must be a whole number"),
    ({"epochs": 1.0}, "--epochs must be a whole number, got 1.0"),     # argparse would refuse it in the job
    ({"epochs": "1\n"}, "--epochs must be a whole number"),            # int() would strip the newline
    ({"epochs": True}, "--epochs must be a whole number, got True"),
    ({"epochs": None}, "--epochs must be a whole number, got None"),
    ({"epochs": "٣"}, "--epochs must be a whole number"),          # a non-ASCII digit
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"lr": "1e999"}, "--lr must be a finite number"),
    ({"lr": "nan"}, "--lr must be a finite number"),
    ({"cpus_per_worker": 0.02}, "--cpus-per-worker must be at least 1"),
    ({"num_workers": 10**9}, "--num-workers must be in"),
    ({"num_workers": 0}, "--num-workers"),
    ({"lr": 0}, "--lr"),
    ({"batch_size": 1, "num_workers": 2}, "--batch-size must be at least num_workers"),
    ({"epoch": 2}, "unknown parameter.*epoch.*known:.*epochs"),
])
def test_bad_parameters_are_named(params, match):
    with pytest.raises(SpecError, match=match):
        build_config("mnist", params)


def test_bad_text_is_refused_before_it_reaches_a_command_line():
    with pytest.raises(SpecError, match="--model must be one line of printable text"):
        build_config("llm", {"model": "tiny\n; rm -rf ~"})


def test_numeric_text_becomes_typed_values_and_the_entrypoint_is_quoted_word_by_word():
    import shlex

    from ray_apps.training import entrypoint_for
    from trainers.specs import validated_params

    given = {"epochs": "3", "lr": "0.01", "train_samples": None}
    params = validated_params(build_config("mnist", given), given)
    assert params == {"epochs": 3, "lr": 0.01, "train_samples": None}
    assert type(params["epochs"]) is int
    words = shlex.split(entrypoint_for("llm", {"model": "tiny", "dataset": "a b;c"}, ["--run-name", "x y"]))
    assert words == ["python", "-m", "trainers.llm", "--model", "tiny", "--dataset", "a b;c", "--run-name", "x y"]
    with pytest.raises(SpecError, match="unknown trainer"):
        entrypoint_for("mnist;id", {})


def test_unknown_trainer():
    with pytest.raises(SpecError, match="unknown trainer 'resnet'.*mnist"):
        spec_for("resnet")


def test_flags_from_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser, MnistConfig)
    args = parser.parse_args(["--epochs", "4", "--train-samples", "100"])
    assert args.epochs == 4 and args.train_samples == 100 and args.batch_size == MnistConfig.batch_size
    only_given = argparse.ArgumentParser()
    add_arguments(only_given, MnistConfig, with_defaults=False)
    assert vars(only_given.parse_args(["--lr", "0.5"])) == {"lr": 0.5}
