"""The model deployments: each replica serves the registry version its selector names now.

A replica loads its version at start, then a watcher thread polls the registry every `watch_s`:
when the selector (the `oppen.serve` tag, or the alias it names) points elsewhere, it loads the new
version beside the old one and swaps a single reference. Requests in flight finish on the old
model, later ones use the new, none fails, and every answer names the version that produced it.

A version is loaded from weights only (trainers.registry's format): one stored any other way, a
pickle above all, is refused without being read, and the replica says why in its status and answers.

The version a replica loaded last is kept on the head's disk (`KeptCopy`): a replica that starts
while the registry is unreachable (one that scales from zero, or replaces a dead one) serves that
copy, read with the same checks, instead of nothing.

Results cross the handle as plain dicts; a refusal is {"error": {"status", "field", "reason"}}.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from ray_apps.config import load_settings
from ray_apps.processes import private_dir
from ray_apps.scheduler.provenance import unrecognised
from ray_apps.serve.http_common import ON_HEAD_NODE
from trainers.errors import OppenError, Refused, Unavailable
from trainers.registry import (
    WEIGHTS_FILE,
    ModelNotFound,
    ModelRefused,
    ModelVersion,
    Selector,
    read_model_files,
    resolve,
    serving_selector,
)

log = logging.getLogger("oppen.models")


def refusal(error: OppenError) -> dict:
    """What a replica answers instead of raising: the ingress raises it again (`OppenError.from_dict`)."""
    return {"error": error.as_dict()}


class ServedModel:
    """What both model deployments share: the registry watch, the atomic swap, the status."""

    name = ""

    def __init__(self, watch_s: float = 2.0):
        import mlflow

        self.uri = load_settings().tracking_uri
        # This replica's process is ours: `models:/` URIs resolve against the platform's registry.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.watch_s = watch_s
        self.current: tuple[ModelVersion, Any] | None = None   # swapped as one reference
        self.selector = Selector()
        self.problem: str | None = None      # why nothing (or not the chosen version) is loaded
        self.refused: str | None = None      # a version refused once is not downloaded again
        self.loads = 0
        self._store = None   # the queue's store, made on first use
        self.kept = KeptCopy(load_settings().data_dir / "served" / self.name)
        try:
            self._refresh()  # serve from the first request when a version exists
        except Exception as exc:  # noqa: BLE001 - MLflow not up yet: start anyway, the watcher retries
            self.problem = f"registry unreachable: {type(exc).__name__}: {str(exc)[:200]}"
            self._serve_kept()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name=f"{self.name}-registry-watch", daemon=True).start()

    def _load_folder(self, folder: Path, what: str) -> Any:
        """The model from a version's files (downloaded or kept), or ModelRefused."""
        raise NotImplementedError

    def _load(self, mv: ModelVersion) -> Any:
        # Downloaded beside the kept copies (same disk): keeping the version is then a rename.
        with tempfile.TemporaryDirectory(dir=self.kept.workspace(), prefix=".download-") as tmp:
            folder = download(self.uri, mv, tmp)
            model = self._load_folder(folder, f"version {mv.version}")
            try:
                self.kept.save(folder, mv)
            except OSError as exc:  # a full disk costs the fallback, not the load
                log.warning("%s: version %s not kept on disk: %s", self.name, mv.version, exc)
        return model

    def _serve_kept(self) -> None:
        """The kept copy of the version loaded last, where there is one that still loads."""
        kept = self.kept.read()
        if kept is None:
            return
        folder, mv = kept
        try:
            self.current = (mv, self._load_folder(folder, f"kept version {mv.version}"))
        except (ModelRefused, OSError, ValueError) as exc:
            log.warning("%s: the kept copy of version %s does not load: %s", self.name, mv.version, exc)
            return
        self.loads += 1
        log.warning("%s: %s; serving the kept copy of version %s", self.name, self.problem, mv.version)

    def _queue_store(self):
        """The queue's store: which MLflow runs its jobs made (made on first use)."""
        if self._store is None:
            from ray_apps.scheduler.api import store_url
            from ray_apps.scheduler.store import JobStore

            self._store = JobStore(store_url(load_settings()))
        return self._store

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_s):
            try:
                self._refresh()
            except Exception as exc:  # noqa: BLE001 - MLflow away: keep serving what is loaded
                self.problem = f"registry unreachable: {type(exc).__name__}: {str(exc)[:200]}"
                log.warning("%s: %s", self.name, self.problem)

    def _refresh(self) -> None:
        self.selector = serving_selector(self.uri, self.name)
        try:
            mv = resolve(self.uri, self.name, self.selector)
        except ModelNotFound as exc:
            self.problem = str(exc)
            return
        if self.current is None or self.current[0].version != mv.version:
            why = unrecognised(self._queue_store(), self.name, mv.version, mv.run_id)
            if why:  # asked each poll: an admin's allowance takes effect on the next one
                self.problem = why
                return
            if self.refused == mv.version:
                return  # self.problem still says why
            started = time.perf_counter()
            try:
                model = self._load(mv)
            except ModelRefused as exc:  # keep serving what is loaded, if anything
                self.refused, self.problem = mv.version, str(exc)
                log.warning("%s: %s", self.name, exc)
                return
            self.current = (mv, model)
            self.loads += 1
            log.info("%s: serving version %s (%s), loaded in %.2f s", self.name, mv.version, self.selector,
                     time.perf_counter() - started)
        self.problem = None

    def status(self) -> dict:
        mv = self.current[0] if self.current else None
        return {"name": self.name, "version": mv.version if mv else None, "run_id": mv.run_id if mv else None,
                "selector": str(self.selector), "problem": self.problem, "loads": self.loads}

    def _serving(self) -> tuple[ModelVersion, Any] | dict:
        current = self.current
        if current is None:
            return refusal(Unavailable(self.problem or f"no version of {self.name!r} loaded yet", "name"))
        return current

    def reconfigure(self, config: dict) -> None:
        self.watch_s = float(config.get("watch_s", self.watch_s))

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()


@serve.deployment(ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=64)
class MnistModel(ServedModel):
    """Digits from 28x28 uint8 images; requests are batched across callers with @serve.batch."""

    name = "mnist"

    def __init__(self):
        self.batching = True
        super().__init__()

    def _load_folder(self, folder: Path, what: str) -> Any:
        import torch  # only once there is a version to serve: an idle platform's replica stays small

        torch.set_num_threads(1)  # one core per replica; replicas, not threads, are the unit of scale
        return load_mnist_folder(folder, what)

    def reconfigure(self, config: dict) -> None:
        super().reconfigure(config)
        self.batching = bool(config.get("batching", True))
        self._predict_batch.set_max_batch_size(int(config.get("max_batch_size", 64)))
        self._predict_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    async def predict(self, images: np.ndarray) -> dict:
        """images: uint8 [N, 28, 28] -> the version and, per image, the digit and its probabilities."""
        if self.batching:
            mv, probs = await self._predict_batch(images)
        else:
            current = self._serving()
            if isinstance(current, dict):
                return current
            mv, probs = current[0], forward(current[1], images)
        if mv is None:
            return probs  # a refusal
        return {"model": self.name, "version": mv.version, "run_id": mv.run_id, "probabilities": probs.tolist()}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, requests: list[np.ndarray]) -> list[tuple]:
        current = self._serving()  # one version for the whole batch
        if isinstance(current, dict):
            return [(None, current)] * len(requests)
        mv, model = current
        probs = forward(model, np.concatenate(requests))
        bounds = np.cumsum([len(r) for r in requests])[:-1]
        return [(mv, p) for p in np.split(probs, bounds)]


def download(uri: str, mv: ModelVersion, dst: str) -> Path:
    """The version's model folder as plain files under `dst`; nothing in it is read here."""
    import mlflow
    from mlflow.tracking import MlflowClient

    source = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(mv.name, mv.version)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri))


class KeptCopy:
    """The version a model's replicas loaded last, as files under `root` (in the private data dir):
    `root/<version>/model/` with the version's registry record beside it, and `root/current`, a
    link swapped in one step, naming the one to serve. Read back with a download's checks."""

    RECORD = "model_version.json"

    def __init__(self, root: Path):
        self.root = root

    def workspace(self) -> Path | None:
        """`root`, made private, for downloads to be kept by a rename; None where it cannot be made."""
        try:
            private_dir(self.root.parent)
            return private_dir(self.root)
        except OSError:
            return None

    def save(self, folder: Path, mv: ModelVersion) -> None:
        """Keep `folder`, the version's files, as the one to serve: moved where it is on the same
        disk, else copied."""
        if not mv.version.isdigit():  # it names a folder: MLflow's versions are numbers
            raise OSError(f"version {mv.version!r} is not a number")
        if self.workspace() is None:
            raise OSError(f"{self.root} cannot be made")
        target = self.root / mv.version
        if not target.exists():  # a version's files never change; another replica may have kept it
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
            try:
                folder.rename(staging / "model")
            except OSError:
                shutil.copytree(folder, staging / "model")
            (staging / self.RECORD).write_text(json.dumps(mv.as_dict()))
            try:
                staging.rename(target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        link = self.root / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(mv.version)
        link.replace(self.root / "current")
        for old in self.root.iterdir():  # only the version served is kept
            if old.name not in {mv.version, "current"} and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)

    def read(self) -> tuple[Path, ModelVersion] | None:
        current = self.root / "current"
        try:
            record = json.loads((current / self.RECORD).read_text())
            return current / "model", ModelVersion(**record)
        except (OSError, ValueError, TypeError) as exc:
            if current.is_symlink():
                log.warning("kept model at %s unreadable: %s", current, exc)
            return None


def load_mnist_version(uri: str, mv: ModelVersion):
    """MnistCNN at the stored width with the stored weights (safetensors), or ModelRefused."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_mnist_folder(download(uri, mv, tmp), f"version {mv.version}")


def load_mnist_folder(folder: Path, what: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trainers.mnist_model import MnistCNN
    from trainers.specs import MnistConfig, SpecError

    width = read_model_files(folder, "mnist", what)["architecture"].get("width")
    try:
        MnistConfig(width=width)  # the trainer's own bounds: a huge width is a memory bomb
        model = MnistCNN(width)
        model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    except (SpecError, TypeError, RuntimeError, SafetensorError) as exc:
        raise ModelRefused(f"{what} of mnist: its weights do not load into MnistCNN(width={width!r}): "
                           f"{str(exc)[:300]}", "version") from None
    return model.eval()


def load_llm_version(uri: str, mv: ModelVersion):
    """(GPT-2 model, tokenizer) from safetensors and JSON files only; the architecture must be the
    catalog's preset the version names; or ModelRefused."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_llm_folder(download(uri, mv, tmp), f"version {mv.version}")


def load_llm_folder(folder: Path, what: str):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from trainers.llm_model import PRESETS

    name = read_model_files(folder, "llm", what)["architecture"].get("model")
    config = GPT2Config.from_pretrained(folder)  # JSON
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None or any(getattr(config, k, None) != v for k, v in preset.items()):
        raise ModelRefused(f"{what} of llm: its architecture ({name!r}, config.json) is not one of the "
                           f"catalog's presets ({', '.join(PRESETS)})", "version")
    model = GPT2LMHeadModel.from_pretrained(folder, config=config, use_safetensors=True)
    return model.eval(), GPT2Tokenizer.from_pretrained(folder)


def forward(model, images: np.ndarray) -> np.ndarray:
    """The trainer's own preprocessing (trainers.mnist_model.to_tensors), then softmax."""
    import torch

    from trainers.mnist_model import to_tensors

    x, _ = to_tensors(images, np.zeros(len(images), dtype=np.int64))
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


@serve.deployment(ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=8)
class LlmModel(ServedModel):
    """Text continuation with the fine-tuned GPT-2-family model and its own tokenizer."""

    name = "llm"

    def _load_folder(self, folder: Path, what: str) -> Any:
        import torch

        torch.set_num_threads(1)
        return load_llm_folder(folder, what)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int | None) -> dict:
        import torch

        current = self._serving()
        if isinstance(current, dict):
            return current
        mv, (model, tokenizer) = current
        ids = tokenizer(prompt, return_tensors="pt")
        context = model.config.n_positions
        if ids["input_ids"].shape[1] + max_new_tokens > context:
            return refusal(Refused(f"prompt ({ids['input_ids'].shape[1]} tokens) + max_new_tokens "
                                   f"({max_new_tokens}) exceeds the model's context of {context} tokens",
                                   "max_new_tokens"))
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 50} if temperature > 0 else \
            {"do_sample": False}
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                                 **sampling)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"model": self.name, "version": mv.version, "run_id": mv.run_id,
                "text": tokenizer.decode(new, skip_special_tokens=True),
                "prompt_tokens": int(ids["input_ids"].shape[1]), "new_tokens": len(new)}
