"""The MLflow Model Registry for the platform's trainers: one registered model per trainer
(`mnist`, `llm`), a version per finished run, tagged with the run's test metric and cost.

Which version is served is also kept here, as the registered model's `oppen.serve` tag
("alias:champion" or "version:3"; none: the `champion` alias, else the newest version). The
serving replicas poll it, so `oppen models serve` and `oppen models promote` reach every replica
wherever it runs, through the one store that already knows the versions.

A version is stored as weights only, never a pickle: MLflow has no authentication, and a pickle
registered by anyone who reaches it would run its code in the serving replica. The run's `model/`
artifacts hold `model.safetensors` and `oppen_model.json` (trainer, format version, the catalog's
architecture parameters); `check_model_files` is the gate the loaders pass first.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainers.errors import NotFound, Refused
from trainers.specs import TRAINERS, servable

SERVE_TAG = "oppen.serve"
DEFAULT_ALIAS = "champion"
MODEL_DIR = "model"                  # a run's model: artifact path, and what a version's source names
FORMAT_FILE = "oppen_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")  # or MLmodel beside them


class RegistryError(Refused):
    """A registry request that cannot be met; `field` names the offending input."""


class ModelNotFound(NotFound, RegistryError):
    pass


class ModelRefused(RegistryError):
    """A version the platform will not load: not stored in its weights-only format."""


@dataclass
class ModelVersion:
    name: str
    version: str
    run_id: str | None
    source: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Selector:
    """Which version to serve: an alias, a fixed version, or (neither) champion-else-newest."""
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        kind, _, value = (text or "").partition(":")
        if kind == "alias" and value:
            return cls(alias=value)
        if kind == "version" and value:
            return cls(version=value)
        return cls()

    def __str__(self) -> str:
        return f"alias:{self.alias}" if self.alias else f"version:{self.version}" if self.version else "default"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def _unless_missing(exc: Exception) -> None:
    """Only "does not exist" is an answer here: a server that is down or stalled must not read as
    an empty registry, so anything else is raised on."""
    if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
        raise exc


def _check_name(name: str) -> None:
    if name not in servable():
        raise ModelNotFound(f"no model {name!r}; the registry holds one per trainer: {', '.join(servable())}",
                            "name")


def _version(mv, aliases: list[str] | None = None) -> ModelVersion:
    return ModelVersion(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source,
                        aliases=sorted(aliases if aliases is not None else (getattr(mv, "aliases", None) or [])),
                        tags=dict(mv.tags or {}), created_ms=int(mv.creation_timestamp or 0))


def register_run(uri: str, run_id: str) -> ModelVersion:
    """Register the model a finished run logged (artifact path `model`) as a new version of its
    trainer's registered model; a run already registered returns its existing version."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        _unless_missing(exc)
        raise ModelNotFound(f"no MLflow run {run_id!r} at {uri}", "run_id") from None
    trainer = run.data.tags.get("oppen.trainer")
    if trainer not in servable():
        raise RegistryError(f"run {run_id} is not a run of a servable trainer ({', '.join(servable())}): "
                            f"its oppen.trainer tag is {trainer!r}", "run_id")
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} is {run.info.status}: only a finished run has a final model", "run_id")
    # A run resumed and finished again logged a new model: it gets a new version. Registering the
    # same finish twice returns the version it already has.
    finished = str(run.info.end_time)
    for mv in client.search_model_versions(f"name = '{trainer}' and run_id = '{run_id}'"):
        if (mv.tags or {}).get("run_end_time") == finished:
            return _version(client.get_model_version(trainer, mv.version))
    metric = TRAINERS[trainer].val_metric
    metrics = run.data.metrics
    cost = metrics.get("job_cost_usd", metrics.get("cost_usd"))
    tags = {"trainer": trainer, "run_id": run_id, "run_end_time": finished, "metric": metric,
            **({metric: f"{metrics[metric]:.6g}"} if metric in metrics else {}),
            **({"cost_usd": f"{cost:.6g}"} if cost is not None else {})}
    try:
        client.get_registered_model(trainer)
    except MlflowException as exc:
        _unless_missing(exc)
        client.create_registered_model(trainer, description=f"Oppen's {trainer} trainer: a version per run",
                                       tags={"trainer": trainer})
    check_model_files([Path(f.path).name for f in client.list_artifacts(run_id, MODEL_DIR)], trainer,
                      f"run {run_id}")
    # Plain artifacts, not an MLflow flavour: their location is the version's source.
    mv = client.create_model_version(trainer, source=f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
                                     tags=tags)
    return _version(client.get_model_version(trainer, mv.version))


def list_models(uri: str) -> list[dict[str, Any]]:
    """Every servable registered model with its versions (newest first), aliases and serve choice."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    out = []
    for name in servable():
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            _unless_missing(exc)
            continue
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        versions = [_version(mv, by_version.get(str(mv.version), []))
                    for mv in client.search_model_versions(f"name = '{name}'")]
        versions.sort(key=lambda v: int(v.version), reverse=True)
        out.append({"name": name, "versions": [v.as_dict() for v in versions],
                    "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
                    "serve": str(Selector.parse((model.tags or {}).get(SERVE_TAG)))})
    return out


def get_version(uri: str, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    _check_name(name)
    if not str(version).isdigit():
        raise RegistryError(f"version must be a whole number, got {version!r}", "version")
    try:
        return _version(_client(uri).get_model_version(name, str(version)))
    except MlflowException as exc:
        _unless_missing(exc)
        raise ModelNotFound(f"model {name!r} has no version {version}", "version") from None


def promote(uri: str, name: str, version: str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
    """Point `alias` at `version`; replicas serving that alias move to it on their next poll."""
    if not alias or not alias.replace("-", "").replace("_", "").isalnum() or alias.isdigit():
        raise RegistryError(f"alias must be a name of letters, digits, '-' or '_' (not a number), got {alias!r}",
                            "alias")
    mv = get_version(uri, name, version)
    check_stored_version(uri, mv)
    _client(uri).set_registered_model_alias(name, alias, mv.version)
    return get_version(uri, name, version)


def set_serving(uri: str, name: str, selector: Selector) -> ModelVersion:
    """Choose what the serving replicas load for `name`; checked against the registry first."""
    resolved = resolve(uri, name, selector)
    check_stored_version(uri, resolved)
    _client(uri).set_registered_model_tag(name, SERVE_TAG, str(selector))
    return resolved


def serving_selector(uri: str, name: str) -> Selector:
    from mlflow.exceptions import MlflowException

    try:
        return Selector.parse((_client(uri).get_registered_model(name).tags or {}).get(SERVE_TAG))
    except MlflowException as exc:
        _unless_missing(exc)
        return Selector()


def resolve(uri: str, name: str, selector: Selector | None = None) -> ModelVersion:
    """The version `selector` names now; by default the `champion` alias, else the newest version."""
    from mlflow.exceptions import MlflowException

    _check_name(name)
    selector = selector or Selector()
    client = _client(uri)
    if selector.version:
        return get_version(uri, name, selector.version)
    alias = selector.alias or DEFAULT_ALIAS
    try:
        return _version(client.get_model_version_by_alias(name, alias), [alias])
    except MlflowException as exc:
        _unless_missing(exc)
        if selector.alias:
            raise ModelNotFound(f"model {name!r} has no alias {alias!r}", "alias") from None
    versions = client.search_model_versions(f"name = '{name}'") if _exists(client, name) else []
    if not versions:
        raise ModelNotFound(f"no version of {name!r} is registered yet: a finished `oppen train {name}` run "
                            f"registers one (or `oppen models register RUN_ID`)", "name")
    return _version(max(versions, key=lambda mv: int(mv.version)))


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        _unless_missing(exc)
        return False


def write_model_files(folder: str | Path, trainer: str, architecture: dict[str, Any], state_dict=None) -> None:
    """The platform's stored form of a model, into `folder`: the weights as safetensors (unless the
    caller wrote them, as `save_pretrained` does) and the JSON a loader rebuilds the architecture from."""
    folder = Path(folder)
    if state_dict is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / WEIGHTS_FILE)
    (folder / FORMAT_FILE).write_text(json.dumps(
        {"trainer": trainer, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE, "architecture": architecture},
        indent=1))


def check_model_files(files: list[str], trainer: str, what: str) -> None:
    """Refuse (ModelRefused, saying why and what to do) unless `files`, the paths in a version's model
    folder, are the platform's weights-only format with nothing pickled beside it."""
    fix = (f"the platform stores and serves only weights ({WEIGHTS_FILE} + {FORMAT_FILE}) and never "
           f"unpickles. To fix: retrain with `oppen train {trainer}`, or re-log the weights with "
           f"trainers.registry.write_model_files and register that run")
    pickled = sorted(f for f in files if Path(f).name == "MLmodel" or f.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ModelRefused(f"{what} of {trainer} is stored as a pickle ({', '.join(pickled)}); {fix}", "version")
    missing = [f for f in (FORMAT_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise ModelRefused(f"{what} of {trainer} has no {' or '.join(missing)} "
                           f"(it holds: {', '.join(sorted(files)) or 'nothing'}); {fix}", "version")


def check_stored_version(uri: str, mv: ModelVersion) -> None:
    """Refuse to point the serving at a version the replicas would refuse (they check again: anyone
    who reaches MLflow can move a tag or an alias)."""
    import mlflow

    source = _client(uri).get_model_version_download_uri(mv.name, mv.version)
    files = mlflow.artifacts.list_artifacts(artifact_uri=source, tracking_uri=uri)
    check_model_files([Path(f.path).name for f in files], mv.name, f"version {mv.version}")


def read_model_files(folder: str | Path, trainer: str, what: str) -> dict[str, Any]:
    """The checked contents of `oppen_model.json` in a downloaded model folder."""
    folder = Path(folder)
    check_model_files([p.relative_to(folder).as_posix() for p in folder.rglob("*")], trainer, what)
    try:
        meta = json.loads((folder / FORMAT_FILE).read_text())
    except ValueError as exc:
        raise ModelRefused(f"{what} of {trainer}: {FORMAT_FILE} is not valid JSON ({exc})", "version") from None
    if not isinstance(meta, dict) or meta.get("trainer") != trainer or meta.get("format_version") != FORMAT_VERSION \
            or meta.get("weights") != WEIGHTS_FILE or not isinstance(meta.get("architecture"), dict):
        raise ModelRefused(f"{what} of {trainer}: {FORMAT_FILE} must name trainer {trainer!r}, format_version "
                           f"{FORMAT_VERSION}, weights {WEIGHTS_FILE!r} and an architecture; it holds "
                           f"{json.dumps(meta)[:300]}", "version")
    return meta
