"""The trainer catalog: typed configs, one per workload, with no heavy imports.

The platform (CLI, queue, agent) validates parameters against these dataclasses
before anything reaches Ray, and each trainer parses its command line from the
same fields, so there is one definition of what a valid run is.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trainers.errors import Refused


class SpecError(Refused):
    """A trainer parameter is unknown or out of range; `field` names it."""


@dataclass
class ScalingSpec:
    # One worker with both cores beats two single-thread workers on a 2-core box
    # (gloo all-reduce costs more than it saves); raise it on a cluster.
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data parallel)"})
    cpus_per_worker: float = field(default=2.0, metadata={"help": "CPUs reserved per worker (= torch threads)"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs reserved per worker"})

    def _check_scaling(self) -> None:
        _require(1 <= self.num_workers <= 1024, "num_workers", self.num_workers, "in [1, 1024]")
        # A worker's torch threads take whole cores: a fractional reservation would let a quota
        # of N CPUs run many times N busy threads.
        _require(1 <= self.cpus_per_worker <= 512, "cpus_per_worker", self.cpus_per_worker,
                 "at least 1 (a worker takes whole cores)")
        _require(0 <= self.gpus_per_worker <= 64, "gpus_per_worker", self.gpus_per_worker, "in [0, 64]")

    @property
    def total_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def total_gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


@dataclass
class MnistConfig(ScalingSpec):
    tracked: ClassVar[bool] = True  # logs to MLflow: the platform creates its run up front
    # Progress is reported once per epoch (MLflow step = epochs done), and the
    # validation metric that says whether more epochs still help.
    unit: ClassVar[str] = "epoch"
    unit_timer: ClassVar[str] = "epoch_time_s"  # a unit's own training time, logged with each point
    val_metric: ClassVar[str] = "test_accuracy"
    val_higher_is_better: ClassVar[bool] = True
    epochs: int = field(default=2, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=128, metadata={"help": "global batch, split across workers"})
    # Adam with a one-cycle schedule reaches >= 99% test accuracy in 2 epochs.
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (one-cycle)"})
    width: int = field(default=16, metadata={"help": "channels of the first conv block"})
    # Small dataset option for tests: the first N examples of the real split.
    train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    test_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})
    seed: int = 0
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})

    def __post_init__(self) -> None:
        self._check_scaling()
        _require(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _require(self.batch_size >= self.num_workers, "batch_size", self.batch_size,
                 f"at least num_workers ({self.num_workers})")
        _require(0 < self.lr <= 10, "lr", self.lr, "in (0, 10]")
        _require(1 <= self.width <= 512, "width", self.width, "in [1, 512]")
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, "at least 1")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")

    def total_units(self) -> int:
        return self.epochs

    def work_per_unit(self) -> int:
        """Work per epoch in training-example equivalents: cost forecasts scale past runs' time by it.
        The test set is scored every epoch too, at about a third of the cost (a forward pass only)."""
        train = min(self.train_samples or 60_000, 60_000)  # MNIST has 60k training and 10k test images
        return train + min(self.test_samples or 10_000, 10_000) // 3

    def memory_per_worker_gib(self) -> float:
        """Estimated peak RSS of one worker: ~0.45 GiB of Python/torch/Ray, plus the images
        as uint8 and float32 (5 bytes a pixel). Measured: 0.71 GiB on full MNIST."""
        images = (self.train_samples or 60_000) + (self.test_samples or 10_000)
        return 0.45 + images * 784 * 5 / 2**30


@dataclass
class ProbeConfig(ScalingSpec):
    """A synthetic job that holds its gang for a set time: scheduler tests and benchmarks."""

    tracked: ClassVar[bool] = False

    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    seconds: float = field(default=5.0, metadata={"help": "how long to hold the resources"})

    def __post_init__(self) -> None:
        self._check_scaling()
        _require(0 <= self.seconds <= 86400, "seconds", self.seconds, "in [0, 86400]")

    def memory_per_worker_gib(self) -> float:
        return 0.15  # a Ray driver and a placement group: no data


# The model presets and corpora, repeated here without importing torch/transformers
# (trainers.llm_model.PRESETS and trainers.text_data.CORPORA; a unit test keeps them equal).
LLM_CONTEXT = {"distilgpt2": 1024, "tiny": 256}
LLM_CORPORA = ("wikitext-2", "shakespeare", "pydoc")


@dataclass
class LlmConfig(ScalingSpec):
    tracked: ClassVar[bool] = True
    unit: ClassVar[str] = "step"               # progress: MLflow step = optimizer steps done
    unit_timer: ClassVar[str] = "step_time_s"
    val_metric: ClassVar[str] = "eval_loss"
    val_higher_is_better: ClassVar[bool] = False

    model: str = field(default="distilgpt2", metadata={"help": f"one of {', '.join(LLM_CONTEXT)}"})
    dataset: str = field(default="wikitext-2", metadata={"help": f"one of {', '.join(LLM_CORPORA)}"})
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch, split across workers"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 5e-5 fine-tuning pretrained weights, 1e-3 from scratch)"})
    weight_decay: float = 0.01
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup, then linear decay to 0"})
    epochs: int = field(default=1, metadata={"help": "passes over the training text (unless --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations and checkpoints"})
    eval_batches: int = field(default=20, metadata={"help": "held-out batches per evaluation"})
    max_train_tokens: int | None = field(default=None, metadata={"help": "use only the first N training tokens"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16/fp16 on CUDA), bf16, fp16 or fp32"})
    seed: int = 0
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})

    def __post_init__(self) -> None:
        self._check_scaling()
        _require(self.model in LLM_CONTEXT, "model", self.model, f"one of {', '.join(LLM_CONTEXT)}")
        _require(self.dataset in LLM_CORPORA, "dataset", self.dataset, f"one of {', '.join(LLM_CORPORA)}")
        context = LLM_CONTEXT[self.model]
        _require(8 <= self.block_size <= context, "block_size", self.block_size,
                 f"in [8, {context}] ({self.model}'s context is {context} tokens)")
        _require(self.batch_size >= self.num_workers, "batch_size", self.batch_size,
                 f"at least num_workers ({self.num_workers})")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "at least 1")
        _require(self.lr is None or 0 < self.lr <= 1, "lr", self.lr, "in (0, 1]")
        _require(0 <= self.weight_decay < 1, "weight_decay", self.weight_decay, "in [0, 1)")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _require(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "at least 1")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, "at least 1")
        _require(self.eval_batches >= 1, "eval_batches", self.eval_batches, "at least 1")
        _require(self.max_train_tokens is None or self.max_train_tokens >= self.block_size * self.batch_size,
                 "max_train_tokens", self.max_train_tokens, "enough for one batch (block_size x batch_size)")
        _require(self.precision in ("auto", "bf16", "fp16", "fp32"), "precision", self.precision,
                 "one of auto, bf16, fp16, fp32")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")

    def learning_rate(self, model_source: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if model_source.startswith("scratch:") else 5e-5

    def total_units(self) -> int | None:
        return self.max_steps  # with --epochs only, the step count is known once the text is tokenized

    def work_per_unit(self) -> int:
        """Tokens per optimizer step."""
        return self.batch_size * self.block_size * self.grad_accum

    def memory_per_worker_gib(self) -> float:
        """~0.6 GiB of Python/torch/Ray + weights, gradients and AdamW state (16 bytes a parameter)
        + activations. Measured: ~0.9 GiB for tiny; distilgpt2 (82 M parameters) ~2.6 GiB at batch 8."""
        params = {"distilgpt2": 82e6, "tiny": 6.9e6}[self.model]
        per_rank = self.batch_size / self.num_workers
        activations = per_rank * self.block_size * {"distilgpt2": 2.0e5, "tiny": 3e4}[self.model]
        return 0.6 + (params * 16 + activations) / 2**30


TRAINERS: dict[str, type] = {"mnist": MnistConfig, "llm": LlmConfig, "probe": ProbeConfig}


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise SpecError(f"--{name.replace('_', '-')} must be {what}, got {value!r}", field=f"params.{name}")


def spec_for(trainer: str) -> type:
    try:
        return TRAINERS[trainer]
    except KeyError:
        raise SpecError(f"unknown trainer {trainer!r}; known: {', '.join(sorted(TRAINERS))}", field="trainer") from None


def build_config(trainer: str, params: dict[str, Any]) -> Any:
    """Validate `params` (field name -> value) for `trainer`; unknown keys are errors."""
    cls = spec_for(trainer)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise SpecError(f"unknown parameter(s) for {trainer}: {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}", field=f"params.{unknown[0]}")
    hints = typing.get_type_hints(cls)
    coerced = {k: _coerce(k, v, hints[k]) for k, v in params.items()}
    return cls(**coerced)


_INT_TEXT = re.compile(r"[+-]?[0-9]{1,15}")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]{1,15}(\.[0-9]{0,15})?|\.[0-9]{1,15})([eE][+-]?[0-9]{1,3})?")
_MAX_TEXT = 64


def validated_params(spec: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The fields the caller set, as the typed values of the validated config (what a job record keeps
    and what reaches the command line), never the raw input."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name in given}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A typed value or a SpecError: the value ends up on a command line, so only well-formed
    numbers and plain one-line text pass (numeric text is accepted: CLI flags and MLflow params)."""
    base = _scalar_type(hint)
    flag = f"--{name.replace('_', '-')}"
    if value is None:
        if base is hint:  # not Optional
            raise SpecError(f"{flag} must be {_kind(base)}, got None", field=f"params.{name}")
        return None
    if isinstance(value, bool):
        raise SpecError(f"{flag} must be {_kind(base)}, got {value!r}", field=f"params.{name}")
    if base is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, str) and _INT_TEXT.fullmatch(value):
            return int(value)
    elif base is float:
        if isinstance(value, numbers.Real) or isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
            number = float(value)
            if math.isfinite(number):
                return number
    elif base is str and isinstance(value, str) and len(value) <= _MAX_TEXT and value.isprintable():
        return value
    raise SpecError(f"{flag} must be {_kind(base)}, got {_shown(value)}", field=f"params.{name}")


def _kind(base: type) -> str:
    return {int: "a whole number", float: "a finite number",
            str: f"one line of printable text (at most {_MAX_TEXT} characters)"}.get(base, base.__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _scalar_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, with_defaults: bool = True) -> None:
    """One `--field-name` flag per config field, defaults from the dataclass.

    Without defaults, only the flags given end up in the namespace (the platform
    then passes just those on to the job).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                            default=f.default if with_defaults else argparse.SUPPRESS, help=f"{help_text} (default: {f.default})".strip())


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
