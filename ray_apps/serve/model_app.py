"""Model serving on Ray Serve: the `models` application of configs/serve.yaml (route /v1/models).

A FastAPI ingress validates requests and calls the MnistModel and LlmModel deployments through
handles (ray_apps/serve/served_models.py); batching, replicas and autoscaling are set per
deployment in configs/serve.yaml. Every answer names the model version that produced it.

    POST /v1/models/mnist/predict   {"images": [[[0..255 x28] x28], ...]} or {"png_base64": [...]}
    POST /v1/models/llm/generate    {"prompt": "...", "max_new_tokens": 32, "temperature": 0.0}
    GET  /v1/models                 registered versions, aliases, and what each replica serves
    POST /v1/models/{name}/serve    {"alias": "champion"} or {"version": "3"}: roll over to it
"""
# No `from __future__ import annotations`: FastAPI under Serve's ingress resolves the
# handlers' annotations at import, and postponed ones would not resolve.
import base64
import binascii
import io
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_apps.audit import AuditLog
from ray_apps.config import load_settings
from ray_apps.auth import Role
from ray_apps.serve.http_common import (ON_HEAD_NODE, actor_of, answers_errors_as_problems, caller_of, errors,
                                        limit_body_size, loopback_hosts_only, require_token, root_without_slash,
                                        settings_users)
from ray_apps.serve.served_models import LlmModel, MnistModel
from ray_apps.scheduler.api import store_url
from ray_apps.scheduler.provenance import serve_if_allowed
from ray_apps.scheduler.store import JobStore
from trainers.errors import NotFound, OppenError, Refused, TooLarge
from trainers.registry import ModelNotFound, Selector, list_models, resolve, serving_selector
from trainers.specs import entry_for, servable

MAX_IMAGES = 256                 # per request; more is a 413 that says so
MAX_BODY_BYTES = 4 * 1024 * 1024  # 256 images as JSON numbers fit in ~1 MB; PNGs in far less
ENDPOINTS = {name: entry_for(name).endpoint for name in servable()}  # model -> its one verb
# The deployments' models (each serving class names its trainer).
MNIST, LLM = MnistModel.func_or_class.name, LlmModel.func_or_class.name

app = FastAPI(title="Oppen models", version="1")


class PredictRequest(BaseModel):
    images: Optional[list[list[list[float]]]] = Field(
        None, description="28x28 grayscale images, pixel values 0-255 (MNIST's own scale)")
    png_base64: Optional[list[str]] = Field(None, description="28x28 grayscale PNGs, base64-encoded")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.images is None) == (self.png_base64 is None):
            raise ValueError("give exactly one of `images` or `png_base64`")
        return self


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=4000)
    max_new_tokens: int = Field(32, ge=1, le=256)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    seed: Optional[int] = None


class ServeRequest(BaseModel):
    alias: Optional[str] = None
    version: Optional[str] = None
    allow_any_run: bool = Field(False, description="serve it although no job of this platform made its run")

    @model_validator(mode="after")
    def _one(self):
        if (self.alias is None) == (self.version is None):
            raise ValueError("give exactly one of `alias` or `version`")
        return self


# Defined above the deployment: Serve's ingress captures the module globals the handlers use.
def decode_images(req: PredictRequest) -> np.ndarray:
    """The request's images as uint8 [N, 28, 28], or a 4xx naming the first bad one."""
    count = len(req.images if req.images is not None else req.png_base64)
    if count == 0:
        raise Refused("no images given", "images")
    if count > MAX_IMAGES:
        raise TooLarge(f"{count} images in one request; at most {MAX_IMAGES}", "images")
    if req.images is not None:
        for i, image in enumerate(req.images):
            shape = (len(image), max((len(row) for row in image), default=0))
            if shape != (28, 28) or any(len(row) != 28 for row in image):
                raise Refused(f"image {i} is {shape[0]}x{shape[1]} (or ragged); expected 28x28", f"images[{i}]")
        array = np.asarray(req.images, dtype=np.float64)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
            raise Refused("pixel values must be finite numbers from 0 to 255", "images")
        return np.rint(array).astype(np.uint8)
    return np.stack([_png(i, text) for i, text in enumerate(req.png_base64)])


def _png(i: int, text: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # PNG only (by its signature), and the size read from the header before any pixel is decoded.
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"]) as img:
            if img.size != (28, 28):
                raise Refused(f"image {i} is {img.size[0]}x{img.size[1]}; expected 28x28", f"png_base64[{i}]")
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except Image.DecompressionBombError:  # raised by open itself for a huge header size
        raise Refused(f"image {i} is far larger than 28x28", f"png_base64[{i}]") from None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise Refused(f"image {i} is not a base64-encoded PNG", f"png_base64[{i}]") from None


def answer(result: dict) -> dict:
    if "error" in result:
        raise OppenError.from_dict(result["error"])
    return result


def unknown_model(name: str, action: str) -> NotFound:
    served = ", ".join(f"{n} ({e})" for n, e in ENDPOINTS.items())
    if name in ENDPOINTS:
        return NotFound(f"model {name!r} has no {action!r} endpoint; use {ENDPOINTS[name]!r}", "name")
    return NotFound(f"no model {name!r}; served: {served}", "name")


limit_body_size(app, MAX_BODY_BYTES)
answers_errors_as_problems(app, public=("/health",))
loopback_hosts_only(app, load_settings().host)
root_without_slash(app)
require_token(app, settings_users, public=("/health",))


@serve.deployment(num_replicas=1, ray_actor_options=ON_HEAD_NODE, max_ongoing_requests=128)
@serve.ingress(app)
class ModelAPI:
    def __init__(self, mnist: DeploymentHandle, llm: DeploymentHandle):
        self.models = {MNIST: mnist, LLM: llm}
        self.settings = load_settings()
        self.store = JobStore(store_url(self.settings))  # which runs the queue's jobs made
        self.audit = AuditLog(self.store.engine)

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @app.post(f"/{MNIST}/predict")
    async def predict_mnist(self, req: PredictRequest, authorization: Optional[str] = Header(None)) -> dict:
        caller_of(settings_users(), authorization, role=Role.MEMBER, action="prediction")
        images = decode_images(req)
        out = answer(await self.models[MNIST].predict.remote(images))
        probs = np.asarray(out.pop("probabilities"))
        out["predictions"] = [{"digit": int(p.argmax()), "probabilities": [round(float(x), 6) for x in p]}
                              for p in probs]
        return out

    @app.post(f"/{LLM}/generate")
    async def generate(self, req: GenerateRequest, authorization: Optional[str] = Header(None)) -> dict:
        caller_of(settings_users(), authorization, role=Role.MEMBER, action="generation")
        return answer(await self.models[LLM].generate.remote(req.prompt, req.max_new_tokens, req.temperature,
                                                             req.seed))

    @app.post("/{name}/predict", responses=errors(404))
    def predict_other(self, name: str) -> dict:
        raise unknown_model(name, "predict")

    @app.post("/{name}/generate", responses=errors(404))
    def generate_other(self, name: str) -> dict:
        raise unknown_model(name, "generate")

    @app.get("/")
    async def models(self) -> list[dict[str, Any]]:
        """The registry's view, the version replicas converge to (`target`), and the replica's own
        report where its model stays loaded: asking one that scales to zero would wake it."""
        uri = self.settings.tracking_uri
        registered = {m["name"]: m for m in list_models(uri)}
        out = []
        for name in servable():
            entry = registered.get(name, {"name": name, "versions": [], "aliases": {}, "serve": "default"})
            try:
                target = resolve(uri, name, serving_selector(uri, name)).version
            except ModelNotFound:
                target = None
            replica = await self.models[name].status.remote() if entry_for(name).stays_loaded else None
            out.append({**entry, "target_version": target, "replica": replica})
        return out

    @app.post("/{name}/serve", responses=errors(404))
    async def serve_version(self, name: str, req: ServeRequest, request: Request,
                            authorization: Optional[str] = Header(None)) -> dict:
        caller = caller_of(settings_users(), authorization)
        actor = actor_of(caller, request)
        with self.audit.refusals(actor, "model.serve", name, req.model_dump()):
            # What every tenant is served: an admin's decision.
            caller.require(Role.ADMIN, "changing the served version")
            if name not in servable():
                raise unknown_model(name, "serve")
        mv = serve_if_allowed(self.settings.tracking_uri, self.store, name,
                              Selector(alias=req.alias, version=req.version), allow_any_run=req.allow_any_run,
                              actor=actor)
        return {"name": name, "selector": str(Selector(alias=req.alias, version=req.version)),
                "version": mv.version, "note": "replicas roll over on their next registry poll"}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: ray_apps.serve.model_app:app_builder` in configs/serve.yaml."""
    return ModelAPI.bind(MnistModel.bind(), LlmModel.bind())
