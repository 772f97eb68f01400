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
