"""MLflow tracking for trainers: batched, from one process, never fatal mid-run.

The driver (the job's entrypoint) owns the run: it checks the server, creates or
reopens the run and closes it. Rank 0 of the workers logs to that run by id over
MLflow's REST API. Metrics, params and tags go out in one `log-batch` per epoch (one
HTTP request per value runs ~100/s). If the server goes away mid-run the training goes
on: values are kept, retried at the next flush, and what was lost is reported.
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from trainers.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
# MLflow retries a failed request 7 times with backoff (minutes) by default; a
# trainer would rather note the loss and keep computing.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingUnavailable(Unavailable):
    """The MLflow tracking server cannot be reached."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure_http() -> None:
    for key, value in _HTTP_ENV.items():
        os.environ.setdefault(key, value)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable with a fix unless `uri` answers its health check."""
    if not uri.startswith(("http://", "https://")):
        return  # a local store (sqlite:, file:) has no server to reach
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(
        f"MLflow tracking server at {uri} is unreachable ({reason}). To fix: start it with "
        "`oppen up`, point MLFLOW_TRACKING_URI at a running server, or pass --no-tracking.")


def open_run(uri: str, *, experiment: str, run_name: str, run_id: str | None = None,
             tags: dict[str, str] | None = None) -> str:
    """Create a run (or reopen `run_id`, e.g. on resume) and return its id."""
    if run_id:
        client = tracking_client(uri)
        client.set_status(run_id, "RUNNING")
        if tags:  # one request for all of them
            client.log_batch(run_id, tags=[("mlflow.runName", run_name), *_strings(tags)])
        return run_id
    return open_new_run(uri, experiment=experiment, run_name=run_name, tags=tags)[0]


def open_new_run(uri: str, *, experiment: str, run_name: str, tags: dict[str, str] | None = None
                 ) -> tuple[str, str]:
    """Create a run in `experiment` (created if new), its tags in the same request: (run id, experiment id)."""
    client = tracking_client(uri)
    experiment_id = client.experiment_id(experiment)
    return client.create_run(experiment_id, run_name, _strings(tags or {})), experiment_id


def _strings(values: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, str(value)) for key, value in values.items()]


def tracking_client(uri: str) -> RestClient | StoreClient:
    """MLflow's REST API for a server (no import of MLflow's client: ~1 s of a process's start), its
    client for a store with no server (sqlite:, file:)."""
    configure_http()
    return RestClient(uri) if uri.startswith(("http://", "https://")) else StoreClient(uri)


class RestClient:
    """The two calls rank 0 makes, `log-batch` and `log-inputs`, over MLflow's REST API (api/2.0)
    with the standard library: importing MLflow's own client costs a worker ~1 s of its start, and
    it would send the same JSON. One attempt per call, MLFLOW_HTTP_REQUEST_TIMEOUT seconds; the
    tracker keeps what fails for its next flush."""

    def __init__(self, uri: str) -> None:
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", _HTTP_ENV["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()

    def _call(self, endpoint: str, body: dict | None = None, *, query: dict | None = None) -> dict:
        """POST `body` (or GET with `query`); MLflow's answer. An error names MLflow's error code."""
        url = self.base + endpoint + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self.headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:  # MLflow's own reason: {"error_code": ..., "message": ...}
            detail = exc.read().decode(errors="replace")[:300]
            try:
                code = json.loads(detail).get("error_code", "")
            except ValueError:
                code = ""
            raise MlflowRestError(f"MLflow answered HTTP {exc.code} to {endpoint}: {detail}", code) from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if there is none (by another process meanwhile too)."""
        for _ in range(2):
            try:
                return self._call("experiments/get-by-name", query={"experiment_name": name})["experiment"][
                    "experiment_id"]
            except MlflowRestError as exc:
                if exc.code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            try:
                return self._call("experiments/create", {"name": name})["experiment_id"]
            except MlflowRestError as exc:
                if exc.code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise MlflowRestError(f"MLflow experiment {name!r} could be neither found nor created", "")

    def create_run(self, experiment_id: str, run_name: str, tags: list[tuple[str, str]]) -> str:
        answer = self._call("runs/create", {
            "experiment_id": experiment_id, "run_name": run_name, "start_time": int(time.time() * 1000),
            "user_id": _user(), "tags": [{"key": k, "value": v} for k, v in tags]})
        return answer["run"]["info"]["run_id"]

    def set_status(self, run_id: str, status: str) -> None:
        body = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = int(time.time() * 1000)
        self._call("runs/update", body)

    def _post(self, endpoint: str, body: dict) -> None:
        self._call(endpoint, body)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._post("runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": _json_double(v), "timestamp": t, "step": step}
                        for k, v, t, step in metrics],
            "params": [{"key": k, "value": v} for k, v in params],
            "tags": [{"key": k, "value": v} for k, v in tags]})

    def log_inputs(self, run_id: str, datasets) -> None:
        self._post("runs/log-inputs", {"run_id": run_id, "datasets": [
            {"tags": [{"key": "mlflow.data.context", "value": context}], "dataset": fields}
            for fields, context in datasets]})


class MlflowRestError(OSError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # MLflow's error_code, e.g. RESOURCE_DOES_NOT_EXIST


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        return "unknown"


def _json_double(value: float) -> float | str:
    """A metric value as protobuf's JSON spells a double: NaN and infinities as strings."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class StoreClient:
    """The same two calls through MLflow's client, for a store with no server (sqlite:, file:)."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    def create_run(self, experiment_id: str, run_name: str, tags: list[tuple[str, str]]) -> str:
        return self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=status)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params],
                              tags=[RunTag(*t) for t in tags])

    def log_inputs(self, run_id: str, datasets) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", context)])
            for fields, context in datasets])


@dataclass
class RunTracker:
    """Logs to one MLflow run by id; keeps what it could not send and says so."""

    uri: str
    run_id: str
    _pending_metrics: list = field(default_factory=list)
    _pending_params: dict = field(default_factory=dict)
    _pending_tags: dict = field(default_factory=dict)
    _pending_inputs: list = field(default_factory=list)
    lost_since: float | None = None
    last_error: str | None = None
    seconds: float = 0.0  # wall time spent sending, to account for tracking overhead

    def __post_init__(self) -> None:
        configure_http()
        self._store: RestClient | StoreClient | None = None

    @property
    def _client(self) -> RestClient | StoreClient:
        if self._store is None:
            self._store = tracking_client(self.uri)
        return self._store

    def log_params(self, params: dict[str, Any]) -> None:
        self._pending_params.update({k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._pending_tags.update({k: str(v) for k, v in tags.items()})

    def log_dataset(self, dataset: dict[str, str] | None, context: str = "training") -> None:
        """A dataset input of the run (the fields of `mlflow.entities.Dataset`: name, digest, source_type,
        source, schema, profile), as the UI's Datasets column shows it. MLflow keeps one input per name
        and digest in a run, so sending it again (a restarted worker, a resume) adds nothing."""
        if dataset:
            self._pending_inputs.append((dataset, context))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending_metrics += [(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> bool:
        """Send everything pending in batches. Returns False if the server is unreachable."""
        start = time.perf_counter()
        try:
            client = self._client
            if self._pending_inputs:
                client.log_inputs(self.run_id, self._pending_inputs)
                self._pending_inputs.clear()
            while self._pending_params or self._pending_tags or self._pending_metrics:
                # One request per epoch, in MLflow's caps: 100 params, 100 tags, 1,000 values in all.
                params, tags = list(self._pending_params.items())[:100], list(self._pending_tags.items())[:100]
                metrics = self._pending_metrics[:1000 - len(params) - len(tags)]
                client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
                for key, _ in params:
                    del self._pending_params[key]
                for key, _ in tags:
                    del self._pending_tags[key]
                del self._pending_metrics[:len(metrics)]
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not stop training
            if self.lost_since is None:
                self.lost_since = time.time()
                log.warning("MLflow tracking lost (%s); training continues, values are kept", exc)
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return False
        finally:
            self.seconds += time.perf_counter() - start
        if self.lost_since is not None:
            log.warning("MLflow tracking restored after %.0f s", time.time() - self.lost_since)
            self.lost_since = None
        return True

    @property
    def unsent(self) -> int:
        return (len(self._pending_metrics) + len(self._pending_params) + len(self._pending_tags) +
                len(self._pending_inputs))

    def report(self) -> str | None:
        """A one-line account of lost tracking, or None if everything was sent."""
        if not self.unsent:
            return None
        return (f"MLflow tracking lost: {self.unsent} value(s) not logged to run {self.run_id} "
                f"at {self.uri} (last error: {self.last_error})")
