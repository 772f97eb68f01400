import argparse

import pytest

from trainers.specs import MnistConfig, SpecError, add_arguments, build_config, spec_for


def test_build_config_coerces_and_validates():
    cfg = build_config("mnist", {"epochs": "3", "lr": "0.01", "num_workers": 2, "gpus_per_worker": 1})
    assert (cfg.epochs, cfg.lr, cfg.total_gpus, cfg.total_cpus) == (3, 0.01, 2, 4)


@pytest.mark.parametrize("params,match", [
    ({"epochs": -1}, "--epochs must be at least 1, got -1"),
    ({"epochs": 1.5}, "--epochs must be int"),
    ({"num_workers": 0}, "--num-workers"),
    ({"lr": 0}, "--lr"),
    ({"batch_size": 1, "num_workers": 2}, "--batch-size must be at least num_workers"),
    ({"epoch": 2}, "unknown parameter.*epoch.*known:.*epochs"),
])
def test_bad_parameters_are_named(params, match):
    with pytest.raises(SpecError, match=match):
        build_config("mnist", params)


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
