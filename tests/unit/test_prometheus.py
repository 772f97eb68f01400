"""configs/prometheus checked by promtool (Debian's `prometheus` package, which .ci/run installs;
skipped with the reason where it is missing) and kept equal to what `oppen up` generates."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_apps.config import Settings
from ray_apps.observability.prometheus import command, prometheus_config

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "configs" / "prometheus"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian: `apt-get install prometheus`; .ci/run "
                                           "installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_checks_the_config_and_the_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "rules.yml")):
        out = promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    out = promtool("test", "rules", "rules.test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


@needs_promtool
def test_promtool_catches_a_broken_rule(tmp_path):
    broken = yaml.safe_load((PROM / "rules.yml").read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum(up{job=\"oppen\"}"  # unbalanced parenthesis
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(broken))
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert out.returncode != 0


def test_the_committed_config_is_what_oppen_up_generates_for_the_defaults():
    committed = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert committed == prometheus_config(Settings(), rules="rules.yml")


def test_oppen_up_writes_the_live_ports_into_its_config(tmp_path):
    settings = Settings(data_dir=tmp_path, metrics_port=9999, ray={"metrics_export_port": 8181},
                        prometheus={"port": 9191})
    cmd = command(settings)
    config = yaml.safe_load((tmp_path / "prometheus" / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert targets == {"ray": ["127.0.0.1:8181"], "oppen": ["127.0.0.1:9999"]}
    assert Path(config["rule_files"][0]).is_file()  # absolute: the config lives in the data dir
    assert "--web.listen-address=127.0.0.1:9191" in cmd and f"--storage.tsdb.path={tmp_path / 'prometheus' / 'data'}" in cmd


def test_oppen_up_runs_prometheus_without_its_lifecycle_or_admin_api(tmp_path):
    # Either would let any caller, a web page's cross-origin POST included, quit, reload or wipe it.
    cmd = command(Settings(data_dir=tmp_path))
    assert not [arg for arg in cmd if arg.startswith(("--web.enable-lifecycle", "--web.enable-admin-api"))], cmd


# --------------------------------------------------------------------------- Grafana dashboards

def panels():
    from ray_apps.observability.dashboards import all_dashboards

    return [(uid, p) for uid, model in all_dashboards().items() for p in model["panels"]]


def test_the_committed_dashboards_are_the_generated_ones():
    import json

    from ray_apps.observability.dashboards import all_dashboards

    committed = {p.stem: json.loads(p.read_text()) for p in (ROOT / "configs" / "grafana").glob("*.json")}
    assert committed == all_dashboards()
    assert set(committed) == {"oppen-queue", "oppen-cost", "oppen-gpus"}


@needs_promtool
def test_every_panel_query_parses_in_promtool(tmp_path):
    rules = [{"record": f"oppen:panel:{uid.replace('-', '_')}_{p['id']}", "expr": p["targets"][0]["expr"]}
             for uid, p in panels()]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "panels.yml")], capture_output=True, text=True)
    assert out.returncode == 0 and f"{len(rules)} rules found" in out.stdout, out.stdout + out.stderr


def test_every_metric_a_panel_or_alert_reads_is_exported(tmp_path):
    import re

    from prometheus_client import CollectorRegistry

    from ray_apps.observability.dashboards import RAY_METRICS
    from ray_apps.observability.metrics import PlatformCollector
    from ray_apps.scheduler.config import QueueConfig
    from ray_apps.scheduler.store import JobStore

    class Q:
        store, config = JobStore(f"sqlite:///{tmp_path / 'q.db'}"), QueueConfig()

    registry = CollectorRegistry()
    registry.register(PlatformCollector(Q()))
    families = {f.name: f.type for f in registry.collect()}
    exported = {f"{name}{suffix}" for name, kind in families.items()
                for suffix in {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])}
    exported |= {"oppen_dispatcher_last_cycle_timestamp_seconds", "oppen_dispatcher_last_cycle_ok"}  # with a heartbeat
    exprs = [p["targets"][0]["expr"] for _, p in panels()]
    exprs += [r["expr"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:oppen|ray)_[a-z_]+)\b", e)}
    assert used - exported - RAY_METRICS == set()
