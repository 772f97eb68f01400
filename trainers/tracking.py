"""MLflow tracking for trainers: batched, from one process, never fatal mid-run.

The driver (the job's entrypoint) owns the run: it checks the server, creates or
reopens the run and closes it. Rank 0 of the workers logs to that run by id over
MLflow's REST API. Metrics, params and tags go out in one `log-batch` per epoch (one
HTTP request per value runs ~100/s). If the server goes away mid-run the training goes
on: values are kept, retried at the next flush, and what was lost is reported.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from trainers import mlflow_calls
from trainers.errors import Unavailable
from trainers.mlflow_calls import RestClient, StoreClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
# MLflow retries a failed request 7 times with backoff (minutes) by default; a
# trainer would rather note the loss and keep computing.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": mlflow_calls.DEFAULT_TIMEOUT_S}


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


def tracking_client(uri: str) -> RestClient | StoreClient:
    """MLflow's REST API for a server, its client for a store with no server (sqlite:, file:)."""
    configure_http()
    return mlflow_calls.client_for(uri)


def open_run(uri: str, *, experiment: str, run_name: str, run_id: str | None = None,
             tags: dict[str, str] | None = None, experiment_id: str | None = None) -> str:
    """Create a run (or reopen `run_id`, e.g. on resume) and return its id; `experiment_id`, when the
    caller knows it, spares looking `experiment` up."""
    if run_id:
        client = tracking_client(uri)
        client.set_status(run_id, "RUNNING")
        if tags:  # one request for all of them
            client.log_batch(run_id, tags=[("mlflow.runName", run_name), *_strings(tags)])
        return run_id
    return open_new_run(uri, experiment=experiment, run_name=run_name, tags=tags, experiment_id=experiment_id)[0]


def open_new_run(uri: str, *, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 experiment_id: str | None = None) -> tuple[str, str]:
    """Create a run in `experiment` (created if new), its tags in the same request: (run id, experiment id)."""
    client = tracking_client(uri)
    experiment_id = experiment_id or client.experiment_id(experiment)
    return client.create_run(experiment_id, run_name, _strings(tags or {})), experiment_id


def _strings(values: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, str(value)) for key, value in values.items()]


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
