"""The MLflow calls a trainer and the queue make (open, close and log to a run), in two forms:

- `RestClient`, to a tracking server: MLflow's REST API (api/2.0) with the standard library. The
  JSON is what MLflow's own client would send; importing that client costs a process ~1 s, on the
  path of a job's start (rank 0, a Tune trial's process, the queue's admission).
- `StoreClient`, to a store with no server (sqlite:, file:): MLflow's client.
"""

from __future__ import annotations

import base64
import getpass
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = "10"


def client_for(uri: str) -> RestClient | StoreClient:
    return RestClient(uri) if uri.startswith(("http://", "https://")) else StoreClient(uri)


class RestClient:
    """The calls over MLflow's REST API (api/2.0), with the standard library. One attempt per call,
    MLFLOW_HTTP_REQUEST_TIMEOUT seconds: a tracker keeps what fails for its next flush."""

    def __init__(self, uri: str) -> None:
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", DEFAULT_TIMEOUT_S))
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

    def run(self, run_id: str) -> RunSummary:
        return RunSummary.of(self._call("runs/get", query={"run_id": run_id})["run"])

    def search_runs(self, experiment_id: str, filter_string: str, max_results: int = 1000) -> list[RunSummary]:
        found, token = [], None
        while len(found) < max_results:
            body = {"experiment_ids": [experiment_id], "filter": filter_string,
                    "max_results": min(max_results - len(found), 1000), **({"page_token": token} if token else {})}
            answer = self._call("runs/search", body)
            found += [RunSummary.of(run) for run in answer.get("runs", [])]
            token = answer.get("next_page_token")
            if not token:
                break
        return found

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("runs/set-tag", {"run_id": run_id, "key": key, "value": value})

    def set_status(self, run_id: str, status: str) -> None:
        body = {"run_id": run_id, "status": status}
        if status != "RUNNING":
            body["end_time"] = int(time.time() * 1000)
        self._call("runs/update", body)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._call("runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": _json_double(v), "timestamp": t, "step": step}
                        for k, v, t, step in metrics],
            "params": [{"key": k, "value": v} for k, v in params],
            "tags": [{"key": k, "value": v} for k, v in tags]})

    def log_inputs(self, run_id: str, datasets) -> None:
        self._call("runs/log-inputs", {"run_id": run_id, "datasets": [
            {"tags": [{"key": "mlflow.data.context", "value": context}], "dataset": fields}
            for fields, context in datasets]})


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    status: str
    tags: dict[str, str]

    @classmethod
    def of(cls, run: dict) -> RunSummary:
        """From MLflow's JSON of a run."""
        info = run["info"]
        tags = {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}
        return cls(info["run_id"], info["experiment_id"], info["status"], tags)


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
    """The same calls through MLflow's client, for a store with no server (sqlite:, file:)."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    def create_run(self, experiment_id: str, run_name: str, tags: list[tuple[str, str]]) -> str:
        return self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id

    def run(self, run_id: str) -> RunSummary:
        run = self.client.get_run(run_id)
        return RunSummary(run.info.run_id, run.info.experiment_id, run.info.status, dict(run.data.tags))

    def search_runs(self, experiment_id: str, filter_string: str, max_results: int = 1000) -> list[RunSummary]:
        return [RunSummary(r.info.run_id, r.info.experiment_id, r.info.status, dict(r.data.tags))
                for r in self.client.search_runs([experiment_id], filter_string=filter_string, max_results=max_results)]

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

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
