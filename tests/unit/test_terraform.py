"""terraform/ checked offline: formatting (when a terraform binary exists), structure through
python-hcl2 (pins, the operator chart, validated variables, outputs, files it reads), and checkov
over terraform/ and kuberay/ with its skips written down in .checkov.yaml."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.tf import blocks, load_tf

ROOT = Path(__file__).resolve().parents[2]
TF = ROOT / "terraform"
EXACT = re.compile(r"^\d+\.\d+\.\d+$")


def tf(name: str) -> dict:
    return load_tf(TF / f"{name}.tf")


def test_terraform_fmt_check(tmp_path):
    terraform = shutil.which("terraform") or shutil.which("tofu")
    if terraform is None:
        pytest.skip("no terraform (or tofu) binary on PATH: HashiCorp's releases are not on PyPI or Debian; "
                    "the structure checks below still run")
    out = subprocess.run([terraform, "fmt", "-check", "-diff", "-recursive", str(TF)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (tmp_path / "main.tf").write_text((TF / "main.tf").read_text().replace("  name           =", "  name =", 1))
    misaligned = subprocess.run([terraform, "fmt", "-check", str(tmp_path)], capture_output=True, text=True)
    assert misaligned.returncode != 0  # the check does catch a formatting slip


def test_every_provider_is_pinned_to_an_exact_version():
    providers = tf("versions")["terraform"][0]["required_providers"][0]
    assert set(providers) == {"kind", "helm", "kubernetes", "kubectl", "random"}
    for name, spec in providers.items():
        assert EXACT.match(spec["version"]), f"{name} pinned loosely: {spec['version']!r}"
        assert "/" in spec["source"], name


def test_the_kuberay_operator_chart_is_1_7_0_and_matches_the_crds_we_validate_against():
    variables = blocks(tf("variables"), "variable")
    assert variables["kuberay_operator_version"]["default"] == "1.7.0"
    release = blocks(tf("main"), "resource")["helm_release.kuberay_operator"]
    assert release["chart"] == "kuberay-operator" and release["version"] == "${var.kuberay_operator_version}"
    crds_readme = ROOT.parent / "shared" / "kuberay-crds" / "README.md"
    if crds_readme.exists():
        assert "KubeRay v1.7.0" in crds_readme.read_text()


def test_every_chart_version_is_an_exact_validated_variable():
    variables = blocks(tf("variables"), "variable")
    for name, release in blocks(tf("main"), "resource").items():
        if name.startswith("helm_release."):
            var = re.fullmatch(r"\$\{var\.(\w+)\}", release["version"])[1]
            assert EXACT.match(variables[var]["default"]), var
            assert "exact version" in variables[var]["validation"][0]["error_message"]


def test_variables_are_documented_typed_and_validated():
    for name, var in blocks(tf("variables"), "variable").items():
        assert var.get("description") and var.get("type"), name
        if var["type"] != "bool":  # a bool cannot be out of range
            assert var.get("validation"), f"variable {name} accepts anything"
            rule = var["validation"][0]
            assert f"var.{name}" in rule["condition"] and rule["error_message"].endswith("."), name


def test_outputs_give_the_dashboard_mlflow_and_agent_urls():
    outputs = blocks(tf("outputs"), "output")
    for name in ("ray_dashboard_url", "mlflow_url", "agent_url", "platform_api_url"):
        assert outputs[name]["value"].startswith("http://127.0.0.1:${var.local_ports."), name
        assert outputs[name]["description"], name
    assert outputs["agent_url"]["value"].endswith("/v1/agent")


def test_every_manifest_terraform_applies_exists_and_the_cluster_is_patched_not_copied():
    text = (TF / "main.tf").read_text()
    files = re.findall(r'file\("\$\{local\.manifests\}/([^"]+)"\)', text)
    assert set(files) >= {"ray-cluster.kind.yaml", "ray-service.oppen.yaml", "mlflow.yaml", "platform.yaml"}
    for name in files:
        assert (ROOT / "kuberay" / name).is_file(), name
    # The RayCluster is decoded, so it must be one YAML document without anchors (yamldecode's limits).
    raw = (ROOT / "kuberay" / "ray-cluster.kind.yaml").read_text()
    assert len([d for d in yaml.safe_load_all(raw) if d]) == 1 and not re.search(r"[&*][a-z]", raw)


def test_kind_nodes_share_the_data_dir_the_ray_pods_mount():
    cluster = blocks(tf("main"), "resource")["kind_cluster.oppen"]["kind_config"][0]
    mounts = [m["container_path"] for m in cluster["node"][0]["extra_mounts"]]
    mounts += [m["container_path"] for d in cluster["dynamic"] for body in d.values()
               for m in body["content"][0]["extra_mounts"]]
    assert mounts.count("/oppen-data") == 3  # control plane, CPU nodes, GPU nodes
    ray_cluster = yaml.safe_load((ROOT / "kuberay" / "ray-cluster.kind.yaml").read_text())
    paths = {v["hostPath"]["path"] for g in [ray_cluster["spec"]["headGroupSpec"], *ray_cluster["spec"]["workerGroupSpecs"]]
             for v in g["template"]["spec"]["volumes"] if "hostPath" in v}
    assert paths == {"/oppen-data"}


def _checkov() -> str | None:
    venv_tools = ROOT / ".venv-tools" / "bin" / "checkov"
    return str(venv_tools) if venv_tools.exists() else shutil.which("checkov")


@pytest.mark.slow
def test_checkov_passes_with_its_skips_argued():
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not installed: the README's test command puts it in .venv-tools "
                    "(its pins clash with the platform's, so it gets a venv of its own)")
    config = yaml.safe_load((ROOT / ".checkov.yaml").read_text())
    reasons = (ROOT / ".checkov.yaml").read_text()
    for check in config["skip-check"]:
        assert re.search(rf"#.*\n\s*- {check}\b|- {check}\s+#", reasons), f"{check} is skipped without a reason"
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    failed, passed = [], 0
    for folder in ("terraform", "kuberay"):  # one run each: checkov prints one JSON document per run
        out = subprocess.run([checkov, "--config-file", str(ROOT / ".checkov.yaml"), "-d", folder, "-o", "json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        try:
            reports = json.loads(out.stdout)
        except ValueError:
            pytest.fail(f"checkov on {folder} printed no JSON:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        for report in reports if isinstance(reports, list) else [reports]:
            passed += report.get("summary", {}).get("passed", 0)
            failed += [f"{report['check_type']}: {c['check_id']} {c['resource']} ({c['file_path']})"
                       for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == [] and passed > 50, "\n".join(failed)
    print(f"checkov: {passed} passed, {len(config['skip-check'])} skipped by .checkov.yaml", file=sys.stderr)


def test_monitoring_is_applied_with_kube_prometheus_stack_and_loads_the_dashboards():
    resources = blocks(tf("main"), "resource")
    monitors = resources["kubectl_manifest.monitoring"]
    assert "var.enable_monitoring" in monitors["for_each"] and "monitoring.yaml" in (TF / "main.tf").read_text()
    dashboards = resources["kubernetes_config_map_v1.grafana_dashboards"]
    assert dashboards["metadata"][0]["labels"] == {"grafana_dashboard": "1"}
    assert "configs/grafana" in dashboards["data"] and list((ROOT / "configs" / "grafana").glob("*.json"))
