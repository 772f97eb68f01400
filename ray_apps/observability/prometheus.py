"""A local Prometheus for the embedded platform: its config from the settings, and what `oppen up`
runs. configs/prometheus/prometheus.yml is this config for the default settings (a test keeps
them equal); configs/prometheus/rules.yml holds the alerts, unit-tested with `promtool test rules`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ray_apps.config import CONFIG_DIR, Settings

RULES = CONFIG_DIR / "prometheus" / "rules.yml"


def _target(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"{host}:{port}"


def prometheus_config(settings: Settings, rules: str | Path = RULES) -> dict:
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            # Ray's own metrics and Serve's (ray_serve_*), from the head's metrics agent.
            {"job_name": "ray", "static_configs": [{"targets": [_target(settings, settings.ray.metrics_export_port)]}]},
            # The platform's: queue, admissions, preemptions, rejections, cost (the dispatcher serves them).
            {"job_name": "oppen", "static_configs": [{"targets": [_target(settings, settings.metrics_port)]}]},
        ],
    }


def binary(settings: Settings) -> str | None:
    return shutil.which(settings.prometheus.binary) if settings.prometheus.enabled else None


def url(settings: Settings) -> str:
    return f"http://{_target(settings, settings.prometheus.port)}"


def command(settings: Settings) -> list[str]:
    """Write the config into the data dir and return the command that runs Prometheus on it.

    No --web.enable-lifecycle: it lets anyone who reaches the port, a web page's cross-origin
    POST included, stop Prometheus (/-/quit) or reload it (/-/reload); a new config takes a restart."""
    folder = settings.data_dir / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(settings), sort_keys=False))
    return [binary(settings) or settings.prometheus.binary, f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}", f"--storage.tsdb.retention.time={settings.prometheus.retention}",
            f"--web.listen-address={_target(settings, settings.prometheus.port)}"]
