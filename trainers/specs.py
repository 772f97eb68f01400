"""The trainer catalog: typed configs, one per workload, with no heavy imports.

The platform (CLI, queue, agent) validates parameters against these dataclasses
before anything reaches Ray, and each trainer parses its command line from the
same fields, so there is one definition of what a valid run is.

It is also the one place that says what the platform does with each trainer: each
config's `entry` (an `Entry`) says whether users may start it, tune it (its default
search space) or have its model served (the endpoint's verb), and the words people
call it by. A field's numeric bounds (`ge`, `gt`, `le`, `lt`) and `choices` are field
metadata, checked here and advertised in the agent's tool schemas; rules across
fields stay in `__post_init__`. Everything else asks these helpers rather than
naming a trainer: `user_trainers()`, `tunable()`, `servable()`, `trainer_for_word()`.
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


@dataclass(frozen=True)
class Entry:
    """What the platform does with a trainer, besides validating its parameters."""

    name: str
    summary: str                              # a few words for people choosing one
    user: bool = True                         # users may start it; False: internal (the scheduler's probe)
    search_space: tuple[str, ...] = ()        # default Tune space (trainers.tune syntax); empty: not tunable
    endpoint: str | None = None               # serving verb: POST /v1/models/{name}/{endpoint}; None: not served
    # Its serving replicas stay up (min_replicas >= 1 in configs/serve.yaml): asking one which
    # version it serves is cheap (locally, where `serve_on_demand` starts it on first use, asking
    # starts it). A model that scales to zero loads on its next request.
    stays_loaded: bool = False
    words: tuple[str, ...] = ()               # single words the agent's router knows it by, besides its name
    phrases: tuple[str, ...] = ()             # and multi-word names
    # Words that also set a parameter when this trainer is meant, e.g. "tiny" -> model=tiny.
    word_params: tuple[tuple[str, str, str], ...] = ()

    @property
    def tunable(self) -> bool:
        return bool(self.search_space)

    @property
    def servable(self) -> bool:
        return self.endpoint is not None


# Field metadata keys the catalog checks and the tool schemas advertise (pydantic's names).
BOUND_KEYS = ("ge", "gt", "le", "lt")

# A worker's torch threads take whole cores: a fractional reservation would let a quota
# of N CPUs run many times N busy threads.
_CPUS = {"ge": 1, "le": 512, "ge_why": "a worker takes whole cores"}


@dataclass
class ScalingSpec:
    # One worker with both cores beats two single-thread workers on a 2-core box
    # (gloo all-reduce costs more than it saves); raise it on a cluster.
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data parallel)", "ge": 1, "le": 1024})
    cpus_per_worker: float = field(default=2.0, metadata={"help": "CPUs reserved per worker (= torch threads)",
                                                          **_CPUS})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs reserved per worker", "ge": 0, "le": 64})

    def _check_fields(self) -> None:
        """Each field against its own bounds and choices (field metadata)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # an optional field left unset
                continue
            _require(_within(f.metadata, value), f.name, value, _bounds_text(f.metadata, value))

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
    entry: ClassVar[Entry] = Entry(
        "mnist", "a digits CNN",
        search_space=("lr=loguniform:3e-4:1e-2", "batch_size=choice:64,128,256", "width=choice:8,16,32"),
        endpoint="predict", stays_loaded=True, words=("digits", "digit", "cnn"))

    epochs: int = field(default=2, metadata={"help": "passes over the training set", "ge": 1})
    batch_size: int = field(default=128, metadata={"help": "global batch, split across workers", "ge": 1})
    # Adam with a one-cycle schedule reaches >= 99% test accuracy in 2 epochs.
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (one-cycle)", "gt": 0, "le": 10})
    width: int = field(default=16, metadata={"help": "channels of the first conv block", "ge": 1, "le": 512})
    # Small dataset option for tests: the first N examples of the real split.
    train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images",
                                                               "ge": 1})
    test_samples: int | None = field(default=None, metadata={"help": "use only the first N test images", "ge": 1})
    # A name in the dataset catalog (configs/datasets.yaml, `oppen data list`) of kind images.
    dataset: str = field(default="mnist", metadata={"help": "an images dataset of the dataset catalog",
                                                    "dataset_kind": "images"})
    # memory: each worker holds the decoded set (fastest while it fits); ray-data: a Ray Data pipeline
    # decodes and streams the training images to the workers (any size; the test split stays in memory).
    data_pipeline: str = field(default="memory", metadata={"help": "memory or ray-data (streamed by Ray Data)",
                                                           "choices": ("memory", "ray-data")})
    seed: int = 0
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint",
                                                   "ge": 0})

    def __post_init__(self) -> None:
        self._check_fields()
        _require(self.batch_size >= self.num_workers, "batch_size", self.batch_size,
                 f"at least num_workers ({self.num_workers})")

    def total_units(self) -> int:
        return self.epochs

    def tune_reports(self) -> int:
        """How many results a Tune trial reports (what ASHA counts): one per epoch."""
        return self.epochs

    def work_per_unit(self) -> int:
        """Work per epoch in training-example equivalents: cost forecasts scale past runs' time by it.
        The test set is scored every epoch too, at about a third of the cost (a forward pass only)."""
        train = min(self.train_samples or 60_000, 60_000)  # MNIST has 60k training and 10k test images
        return train + min(self.test_samples or 10_000, 10_000) // 3

    def memory_per_worker_gib(self) -> float:
        """Estimated peak RSS of one worker: ~0.45 GiB of Python/torch/Ray, plus the images
        as uint8 and float32 (5 bytes a pixel). Measured: 0.71 GiB on full MNIST."""
        train = 0 if self.data_pipeline == "ray-data" else (self.train_samples or 60_000)  # streamed
        images = train + (self.test_samples or 10_000)
        return 0.45 + images * 784 * 5 / 2**30


@dataclass
class ProbeConfig(ScalingSpec):
    """A synthetic job that holds its gang for a set time: scheduler tests and benchmarks."""

    tracked: ClassVar[bool] = False
    entry: ClassVar[Entry] = Entry("probe", "a synthetic gang for scheduler tests", user=False)

    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker", **_CPUS})
    seconds: float = field(default=5.0, metadata={"help": "how long to hold the resources", "ge": 0, "le": 86400})

    def __post_init__(self) -> None:
        self._check_fields()

    def memory_per_worker_gib(self) -> float:
        return 0.15  # a Ray driver and a placement group: no data


# The model presets and built-in corpora, repeated here without importing torch/transformers
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
    entry: ClassVar[Entry] = Entry(
        "llm", "DistilGPT2",
        search_space=("lr=loguniform:1e-4:3e-3", "warmup_steps=choice:0,10,20", "batch_size=choice:4,8"),
        endpoint="generate", stays_loaded=False,
        words=("gpt", "gpt2", "distilgpt2", "language", "wikitext", "lm"),
        phrases=("language model", "text model"), word_params=(("tiny", "model", "tiny"),))

    model: str = field(default="distilgpt2", metadata={"help": f"one of {', '.join(LLM_CONTEXT)}",
                                                       "choices": tuple(LLM_CONTEXT)})
    # A name in the dataset catalog of kind text; the built-in corpora are LLM_CORPORA.
    dataset: str = field(default="wikitext-2", metadata={"help": "a text dataset of the dataset catalog",
                                                         "dataset_kind": "text"})
    # At most the model's context: checked in __post_init__, as it depends on `model`.
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence", "ge": 8})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch, split across workers", "ge": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "ge": 1})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 5e-5 fine-tuning pretrained weights, 1e-3 from scratch)",
        "gt": 0, "le": 1})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "ge": 0, "lt": 1})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup, then linear decay to 0", "ge": 0})
    epochs: int = field(default=1, metadata={"help": "passes over the training text (unless --max-steps)", "ge": 1})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps", "ge": 1})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations and checkpoints", "ge": 1})
    eval_batches: int = field(default=20, metadata={"help": "held-out batches per evaluation", "ge": 1})
    max_train_tokens: int | None = field(default=None, metadata={"help": "use only the first N training tokens"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16/fp16 on CUDA), bf16, fp16 or fp32",
                                                     "choices": ("auto", "bf16", "fp16", "fp32")})
    data_pipeline: str = field(default="memory", metadata={
        "help": "memory or ray-data (tokenized by Ray Data, streamed)", "choices": ("memory", "ray-data")})
    seed: int = 0
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint",
                                                   "ge": 0})

    def __post_init__(self) -> None:
        self._check_fields()
        context = LLM_CONTEXT[self.model]
        _require(self.block_size <= context, "block_size", self.block_size,
                 f"in [8, {context}] ({self.model}'s context is {context} tokens)")
        _require(self.batch_size >= self.num_workers, "batch_size", self.batch_size,
                 f"at least num_workers ({self.num_workers})")
        _require(self.max_train_tokens is None or self.max_train_tokens >= self.block_size * self.batch_size,
                 "max_train_tokens", self.max_train_tokens, "enough for one batch (block_size x batch_size)")

    def learning_rate(self, model_source: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if model_source.startswith("scratch:") else 5e-5

    def total_units(self) -> int | None:
        return self.max_steps  # with --epochs only, the step count is known once the text is tokenized

    def tune_reports(self) -> int:
        """How many results a Tune trial reports (what ASHA counts): one per evaluation. With
        --epochs only the step count is not known before tokenizing: a cap ASHA never reaches."""
        return math.ceil((self.max_steps or 10**6) / self.eval_every)

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


# The catalog, in the order people are offered the trainers: the first user trainer is the
# default where one is needed (e.g. "show the metrics of recent runs").
TRAINERS: dict[str, type] = {cls.entry.name: cls for cls in (MnistConfig, LlmConfig, ProbeConfig)}


def user_trainers() -> tuple[str, ...]:
    """The trainers users may start (the agent's tools offer only these)."""
    return tuple(name for name, cls in TRAINERS.items() if cls.entry.user)


def default_trainer() -> str:
    return user_trainers()[0]


def tunable() -> tuple[str, ...]:
    return tuple(name for name, cls in TRAINERS.items() if cls.entry.tunable)


def servable() -> tuple[str, ...]:
    """Trainers whose runs log a model the serving app can load: one registered model each."""
    return tuple(name for name, cls in TRAINERS.items() if cls.entry.servable)


def entry_for(trainer: str) -> Entry:
    return spec_for(trainer).entry


def router_words() -> dict[str, str]:
    """Every single word the router knows a user trainer by (its name is one) -> the trainer."""
    return {word: name for name, cls in TRAINERS.items() if cls.entry.user for word in (name, *cls.entry.words)}


def router_phrases() -> dict[str, str]:
    """Multi-word names of user trainers -> the trainer."""
    return {phrase: name for name, cls in TRAINERS.items() if cls.entry.user for phrase in cls.entry.phrases}


def trainer_for_word(word: str) -> str | None:
    """The user trainer a word or phrase names, else None."""
    return router_words().get(word) or router_phrases().get(word)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise SpecError(f"--{name.replace('_', '-')} must be {what}, got {value!r}", field=f"params.{name}")


def bounds_of(f: dataclasses.Field) -> dict[str, Any]:
    """A field's numeric bounds as pydantic's Field arguments: ge, gt, le, lt."""
    return {k: f.metadata[k] for k in BOUND_KEYS if k in f.metadata}


def _within(meta: Any, value: Any) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    if "dataset_kind" in meta:  # a name in the dataset catalog (configs/datasets.yaml) of that kind
        from trainers.dataset_catalog import load_catalog

        return value in load_catalog().names(meta["dataset_kind"])
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"]) and
            ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def widest_bounds(fields: list[dataclasses.Field]) -> dict[str, Any]:
    """The loosest bounds admitting every given field's range (one field name, several trainers):
    a side is bounded only if every field bounds it."""
    out: dict[str, Any] = {}
    for inclusive, exclusive, pick in (("ge", "gt", min), ("le", "lt", max)):
        sides = [(f.metadata[inclusive], True) if inclusive in f.metadata else
                 (f.metadata[exclusive], False) if exclusive in f.metadata else None for f in fields]
        if not sides or None in sides:
            continue
        value = pick(v for v, _ in sides)
        out[inclusive if any(v == value and incl for v, incl in sides) else exclusive] = value
    return out


def bounds_text(f: dataclasses.Field) -> str:
    """What a field takes, e.g. "in [1, 1024]" or "at least 1"; "" when the catalog does not bound it."""
    return _bounds_text(f.metadata)


def _bounds_text(meta: Any, value: Any = None) -> str:
    """What the field takes, the way the error messages say it: "in [1, 1024]", "at least 1"."""
    if "choices" in meta:
        return f"one of {', '.join(meta['choices'])}"
    if "dataset_kind" in meta:
        return _dataset_text(meta["dataset_kind"])
    low, high = meta.get("ge", meta.get("gt")), meta.get("le", meta.get("lt"))
    if low is None and high is None:
        return ""
    if low is not None and "ge_why" in meta and value is not None and value < low:
        return f"at least {low} ({meta['ge_why']})"
    if high is None:
        return f"at least {low}" if "ge" in meta else f"more than {low}"
    if low is None:
        return f"at most {high}" if "le" in meta else f"less than {high}"
    return f"in {'[' if 'ge' in meta else '('}{low}, {high}{']' if 'le' in meta else ')'}"


def _dataset_text(kind: str) -> str:
    """The names a dataset field takes, as the catalog has them now."""
    from trainers.dataset_catalog import load_catalog
    from trainers.errors import OppenError

    try:
        catalog = load_catalog()
    except OppenError:  # a broken catalog is reported where it is loaded; help texts still render
        return f"the name of a {kind} dataset in the dataset catalog"
    return f"one of {', '.join(catalog.names(kind))} (the {kind} datasets of {catalog.path})"


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
