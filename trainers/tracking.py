"""MLflow tracking for trainers: batched, from one process, never fatal mid-run.

The driver (the job's entrypoint) owns the run: it checks the server, creates or
reopens the run and closes it. Rank 0 of the workers logs to that run by id with
an explicit `MlflowClient`. Metrics go out in one `log_batch` per epoch (one HTTP
request per value runs ~100/s). If the server goes away mid-run the training goes
on: values are kept, retried at the next flush, and what was lost is reported.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainers.errors import Unavailable

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

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
    from mlflow.tracking import MlflowClient

    from mlflow.entities import RunTag

    configure_http()
    client = MlflowClient(uri)
    tags = {key: str(value) for key, value in (tags or {}).items()}
    if run_id:
        client.update_run(run_id, status="RUNNING")
        if tags:  # one request for all of them
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {"mlflow.runName": run_name, **tags}.items()])
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    return run_id


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
    # Importing MLflow takes seconds and rank 0 needs its client only at the first flush (an epoch's
    # end): in the background the import runs beside the first steps instead of before them. Only
    # where the caller's thread imports nothing meanwhile: two threads importing at once can deadlock.
    background: bool = False

    def __post_init__(self) -> None:
        configure_http()
        self._connected: MlflowClient | None = None
        self._connect_error: BaseException | None = None
        self._connecting: threading.Thread | None = None
        if self.background:
            self._connecting = threading.Thread(target=self._connect, name="mlflow-client", daemon=True)
            self._connecting.start()
        else:
            self._connect()

    def _connect(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            self._connected = MlflowClient(self.uri)
        except BaseException as exc:  # noqa: BLE001 - raised where the client is first used
            self._connect_error = exc

    @property
    def _client(self) -> MlflowClient:
        if self._connecting is not None:
            self._connecting.join()
        if self._connected is None:
            raise self._connect_error or RuntimeError("no MLflow client")
        return self._connected

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
            from mlflow.entities import Metric, Param, RunTag

            # MLflow caps a batch at 1,000 metrics and 100 params.
            params = [Param(k, v) for k, v in self._pending_params.items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i:i + 100])
            self._pending_params.clear()
            if self._pending_tags:
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._pending_tags.items()])
                self._pending_tags.clear()
            if self._pending_inputs:
                from mlflow.entities import Dataset, DatasetInput, InputTag

                client.log_inputs(self.run_id, datasets=[
                    DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", context)])
                    for fields, context in self._pending_inputs])
                self._pending_inputs.clear()
            while self._pending_metrics:
                client.log_batch(self.run_id, metrics=[Metric(*m) for m in self._pending_metrics[:1000]])
                del self._pending_metrics[:1000]
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
