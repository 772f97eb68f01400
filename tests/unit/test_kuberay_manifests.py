"""kuberay/: the manifests checked offline, as far as a machine without Kubernetes can.

yamllint; core objects against Kubernetes' own OpenAPI schemas (kubernetes-validate --strict) for
the version of the Kind node Terraform creates; RayCluster/RayJob/RayService against the CRDs of
the pinned KubeRay (../shared/kuberay-crds, skipped when absent: a user's clone has no ../shared);
the promises the manifests make to the rest of the project (versions, serve config, settings,
trainer commands, GPU scheduling); and who may reach the Ray pods, by evaluating the
NetworkPolicies against the pods KubeRay makes of the manifests.
"""
import copy
import dataclasses
import functools
import os
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from tests.unit.tf import blocks, load_tf

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
CRDS = Path(os.environ.get("OPPEN_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
IMAGE = "oppen/ray"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in documents(p)]


def ray_objects() -> list[tuple[str, dict]]:
    return [(name, d) for name, d in all_objects() if d["apiVersion"].startswith("ray.io/")]


def by_kind(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in all_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kind_node_version() -> str:
    return blocks(load_tf(ROOT / "terraform" / "variables.tf"), "variable")["kubernetes_version"]["default"][1:]


def pod_specs(obj: dict) -> list[dict]:
    """Every pod template's spec inside a RayCluster, RayJob or RayService."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if "headGroupSpec" in spec else None)
    if cluster is None:
        return []
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_the_manifests_are_all_here():
    assert {p.name for p in MANIFESTS} >= {"ray-cluster.kind.yaml", "ray-job.mnist.yaml", "ray-job.llm.yaml",
                                           "ray-service.oppen.yaml", "mlflow.yaml", "platform.yaml",
                                           "network-policies.yaml"}


@pytest.mark.parametrize("path", MANIFESTS + sorted((ROOT / "configs").glob("**/*.y*ml")), ids=lambda p: p.name)
def test_yamllint_is_clean(path):
    conf = yamllint_config.YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = [f"{path.name}:{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(path.read_text(), conf)]
    assert problems == []


CRD_GROUPS = ("ray.io/", "monitoring.coreos.com/")  # custom resources: not in Kubernetes' own schemas


@pytest.mark.parametrize("name,obj", [(n, d) for n, d in all_objects() if not d["apiVersion"].startswith(CRD_GROUPS)],
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_core_objects_pass_strict_validation_for_the_kind_node_version(name, obj):
    kubernetes_validate.validate(obj, kind_node_version(), strict=True)  # raises with the offending path


def test_strict_validation_would_catch_a_misspelt_field():
    deployment = copy.deepcopy(by_kind("Deployment", "oppen-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # 'resources' misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kind_node_version(), strict=True)


# --------------------------------------------------------------------------- KubeRay CRDs

needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS} (a user's clone has "
                                "no ../shared; set OPPEN_KUBERAY_CRDS to a folder of KubeRay's CRD YAML)")


def _strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields (the API server would drop
    them silently) and does not require fields that have a default (the server fills those in)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        props = schema.get("properties")
        if props is not None:
            if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
            if "required" in schema:
                schema["required"] = [r for r in schema["required"] if "default" not in props.get(r, {})]
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server itself
    return jsonschema.Draft7Validator(schema)


@needs_crds
@pytest.mark.parametrize("name,obj", ray_objects(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_ray_objects_validate_against_the_kuberay_crds(name, obj):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]
    assert errors == []


@needs_crds
def test_the_crd_check_would_catch_a_misspelt_field_and_a_missing_one():
    cluster = copy.deepcopy(by_kind("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][1]["maxReplica"] = 2           # 'maxReplicas' misspelt
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]            # required, no default
    messages = " | ".join(e.message for e in crd_validator("RayCluster").iter_errors(cluster))
    assert "'maxReplica' was unexpected" in messages and "'groupName' is a required property" in messages


# --------------------------------------------------------------------------- promises to the project

def pinned_ray() -> str:
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]


def test_ray_version_equals_the_image_tag_and_the_ray_the_project_pins():
    pinned = pinned_ray()
    for name, obj in ray_objects():
        spec = obj["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        if "headGroupSpec" in cluster:
            assert cluster["rayVersion"] == pinned, name
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                assert container["image"] == f"{IMAGE}:{pinned}", (name, container["name"])
    for name, obj in all_objects():
        for container in (obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            if container["image"].startswith(IMAGE):
                assert container["image"] == f"{IMAGE}:{pinned}", name
    assert f"rayproject/ray:{pinned}-" in (KUBERAY / "Dockerfile").read_text()


def test_the_gpu_group_requests_gpus_tolerates_their_taint_and_scales_from_zero():
    cluster = by_kind("RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    container = gpu["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu["rayStartParams"]["num-gpus"] == gpus == "1"  # Ray's view equals the pod's allocation
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"]["tolerations"]
    cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits
    # The Kind GPU nodes Terraform makes carry the label this group selects and the taint it tolerates.
    main_tf = (ROOT / "terraform" / "main.tf").read_text()
    for key, value in gpu["template"]["spec"]["nodeSelector"].items():
        assert f'"{key}" = "{value}"' in main_tf
    assert "key: nvidia.com/gpu" in main_tf and "effect: NoSchedule" in main_tf


def test_the_rayservice_serves_configs_serve_yaml():
    service = by_kind("RayService")
    in_cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    # The one intended difference: in a pod the proxy listens on the pod's network.
    assert in_cluster["http_options"].pop("host") == "0.0.0.0"
    local["http_options"].pop("host")
    assert in_cluster == local


def test_the_platform_configmap_is_valid_platform_settings(monkeypatch, tmp_path):
    from ray_apps.config import load_settings

    config = by_kind("ConfigMap", "oppen-platform")["data"]["platform.yaml"]
    (tmp_path / "platform.yaml").write_text(config)
    env = {e["name"]: e.get("value") for e in by_kind("Deployment", "oppen-dispatcher")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "OPPEN_QUEUE_DB_URL"):
        monkeypatch.setenv(key, env[key].replace("$(POSTGRES_PASSWORD)", "pw"))
    settings = load_settings(tmp_path / "platform.yaml")
    assert settings.dashboard_url == "http://oppen-head-svc.oppen.svc.cluster.local:8265"
    assert settings.queue_db_url.startswith("postgresql+psycopg2://oppen:pw@oppen-postgres:5432/")
    assert not settings.is_local  # a cluster address: the platform starts no local head


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("ray-job.*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoints_are_valid_trainer_commands(path):
    from trainers.driver import build_parser
    from trainers.specs import TRAINERS, build_config

    job = documents(path)[0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("trainers.")
    trainer = argv[2].removeprefix("trainers.")
    assert job["spec"]["metadata"]["trainer"] == trainer
    spec_cls = TRAINERS[trainer]
    args = build_parser(trainer, spec_cls, "").parse_args(argv[3:])
    spec = build_config(trainer, {f.name: getattr(args, f.name) for f in dataclasses.fields(spec_cls)})
    if "rayClusterSpec" in job["spec"]:  # its own cluster must hold the gang it asks for
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["maxReplicas"] for g in groups)
        assert spec.num_workers * spec.gpus_per_worker <= gpus
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://oppen-mlflow.")


def test_every_secret_a_pod_reads_is_created_by_terraform_or_optional():
    resources = blocks(load_tf(ROOT / "terraform" / "main.tf"), "resource")
    created = {body["metadata"][0]["name"] for name, body in resources.items() if name.startswith("kubernetes_secret_v1.")}
    text = "\n".join(p.read_text() for p in MANIFESTS)
    refs = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: [\w]+\}", text))
    refs |= set(re.findall(r"secretName: ([\w-]+)", text))
    optional = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: \w+, optional: true\}", text))
    assert refs and refs - optional <= created, f"pods read secrets nobody creates: {refs - optional - created}"


def test_shell_scripts_are_shellcheck_clean_and_bring_up_is_marked_not_run_in_ci():
    import shutil
    import subprocess

    script = KUBERAY / "bring-up.sh"
    assert "NOT RUN IN CI" in script.read_text() and os.access(script, os.X_OK)
    shellcheck = ROOT / ".venv-tools" / "bin" / "shellcheck"
    shellcheck = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (the README's test command puts it in .venv-tools)")
    # The platform's own: CI's script and the HAProxy loopback wrapper Ray runs.
    scripts = [script, ROOT / ".ci" / "run", ROOT / "ray_apps" / "serve" / "haproxy_loopback.sh"]
    out = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_cluster_monitoring_matches_the_local_rules_and_scrapes_named_ports():
    rule = by_kind("PrometheusRule")
    local = yaml.safe_load((ROOT / "configs" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == local["groups"]  # one set of alerts, locally and in the cluster
    monitors = {m["metadata"]["name"]: m for _, m in all_objects() if m["kind"] == "PodMonitor"}
    dispatcher = by_kind("Deployment", "oppen-dispatcher")["spec"]["template"]
    ports = {p["name"] for c in dispatcher["spec"]["containers"] for p in c.get("ports", [])}
    assert monitors["oppen-dispatcher"]["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert monitors["oppen-dispatcher"]["spec"]["selector"]["matchLabels"].items() <= \
        dispatcher["metadata"]["labels"].items()
    for name, obj in ray_objects():  # every Ray pod names its metrics port, which the PodMonitor scrapes
        for pod in pod_specs(obj):
            if name in ("ray-cluster.kind.yaml", "ray-service.oppen.yaml"):
                assert any(p.get("name") == "metrics" and p["containerPort"] == 8080
                           for c in pod["containers"] for p in c.get("ports", [])), name


# --------------------------------------------------------------------------- secrets and network policies

NAMESPACE = "oppen"
WORKER_PORT = 12345  # one of the ports Ray picks at start (raylets, object managers, workers)


def secret_refs(pod: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for c in pod["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_the_rayservice_requires_its_tenant_tokens():
    # Its API listens on the pod's network: a pod without the Secret must not start, open to all.
    for pod in pod_specs(by_kind("RayService")):
        assert secret_refs(pod)["OPPEN_TENANT_TOKENS"] == {"name": "oppen-tenant-tokens", "key": "tokens"}
    for name, obj in ray_objects():
        for pod in pod_specs(obj):
            assert [env for env, ref in secret_refs(pod).items() if ref.get("optional")] == [], name


@dataclasses.dataclass
class Pod:
    labels: dict[str, str]
    namespace: str = NAMESPACE
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # container ports by name


def ray_pods() -> dict[str, Pod]:
    """The pods KubeRay 1.7 makes of each Ray object, as "<object>/<group>": the template's labels
    under KubeRay's own (labelPod in ray-operator/controllers/ray/common/pod.go). A RayService's or
    a RayJob's cluster is named <object>-<random suffix>, so its ray.io/cluster is not the name."""
    pods = {}
    for _, obj in ray_objects():
        spec = obj["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if "headGroupSpec" in spec else None)
        if cluster is None:
            continue
        name = obj["metadata"]["name"]
        cluster_name = name if obj["kind"] == "RayCluster" else f"{name}-x7k2q"
        groups = [("head", "headgroup", cluster["headGroupSpec"])]
        groups += [("worker", g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for node_type, group, group_spec in groups:
            template = group_spec["template"]
            labels = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
                      "ray.io/is-ray-node": "yes", **template.get("metadata", {}).get("labels", {}),
                      "ray.io/cluster": cluster_name, "ray.io/node-type": node_type, "ray.io/group": group}
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            pods[f"{name}/{group}"] = Pod(labels, ports=ports)
    return pods


def other_pods() -> dict[str, Pod]:
    def submitter(job: str) -> Pod:  # KubeRay's submitter Job pod (K8sJobMode)
        return Pod({"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job,
                    "app.kubernetes.io/created-by": "kuberay-operator"})

    return {
        "dispatcher": Pod(by_kind("Deployment", "oppen-dispatcher")["spec"]["template"]["metadata"]["labels"]),
        "mlflow": Pod(by_kind("Deployment", "oppen-mlflow")["spec"]["template"]["metadata"]["labels"]),
        "mnist submitter": submitter("mnist"),
        "llm submitter": submitter("llm"),
        "operator": Pod({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system"),  # the Helm chart's
        "prometheus": Pod({"app.kubernetes.io/name": "prometheus"}, "monitoring"),  # prometheus-operator's
        "ingress": Pod({"app.kubernetes.io/name": "ingress-nginx"}, "ingress-nginx"),
        "stranger": Pod({"app": "debug"}),                # any other pod in the namespace
        "outsider": Pod({"app": "debug"}, "default"),     # any pod of another namespace
    }


def namespace_labels(namespace: str) -> dict[str, str]:
    # The ingress's namespace carries the label network-policies.yaml and the README ask for.
    extra = {"oppen/serve-ingress": "true"} if namespace == "ingress-nginx" else {}
    return {"kubernetes.io/metadata.name": namespace, **extra}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector; an empty one selects everything."""
    ops = {"In": lambda key, values: labels.get(key) in values, "NotIn": lambda key, values: labels.get(key) not in values,
           "Exists": lambda key, _: key in labels, "DoesNotExist": lambda key, _: key not in labels}
    return (all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])))


@functools.cache
def network_policies() -> tuple[dict, ...]:
    return tuple(d for _, d in all_objects() if d["kind"] == "NetworkPolicy")


@functools.cache
def _all_pods() -> dict[str, Pod]:
    return {**ray_pods(), **other_pods()}


def all_pods() -> dict[str, Pod]:
    return copy.deepcopy(_all_pods())


def isolating(dst: Pod) -> list[dict]:
    """The ingress policies that select a pod."""
    return [p for p in network_policies() if p["metadata"]["namespace"] == dst.namespace
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], dst.labels)]


def rule_admits_port(rule: dict, dst: Pod, port: int) -> bool:
    def matches(rp: dict) -> bool:
        number = dst.ports.get(rp["port"]) if isinstance(rp.get("port"), str) else rp.get("port")
        return rp.get("protocol", "TCP") == "TCP" and (number is None or number <= port <= rp.get("endPort", number))

    return not rule.get("ports") or any(matches(rp) for rp in rule["ports"])


def reaches(src: Pod, dst: Pod, port: int) -> bool:
    """Whether the NetworkPolicies let src open a TCP connection to dst's port: a pod that no
    ingress policy selects accepts everything; else the union of those policies' rules decides."""
    def peer(p: dict, policy_namespace: str) -> bool:
        if "ipBlock" in p:
            return False
        namespace_ok = (selects(p["namespaceSelector"], namespace_labels(src.namespace)) if "namespaceSelector" in p
                        else src.namespace == policy_namespace)
        return namespace_ok and selects(p.get("podSelector", {}), src.labels)

    policies = isolating(dst)
    return not policies or any(
        (not rule.get("from") or any(peer(p, policy["metadata"]["namespace"]) for p in rule["from"]))
        and rule_admits_port(rule, dst, port)
        for policy in policies for rule in policy["spec"].get("ingress", []))


def test_a_default_deny_isolates_every_pod_of_the_namespace():
    assert any(p["metadata"]["namespace"] == NAMESPACE and p["spec"]["podSelector"] == {}
               and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress") for p in network_policies())
    others = all_pods()
    for name, pod in ray_pods().items():
        for port in [*pod.ports.values(), WORKER_PORT]:
            assert not reaches(others["stranger"], pod, port), (name, port)
            assert not reaches(others["outsider"], pod, port), (name, port)


def test_every_ray_port_is_covered_by_a_policy_that_selects_its_pods():
    # Selected by KubeRay's labels (or, for clusters with generated names, the template's), with a
    # rule that names who may connect: no Ray port is left to the default deny by accident.
    uncovered = [f"{name}:{port_name}/{port}" for name, pod in ray_pods().items() for port_name, port in pod.ports.items()
                 if not any(rule.get("from") and rule_admits_port(rule, pod, port)
                            for policy in isolating(pod) for rule in policy["spec"].get("ingress", []))]
    assert uncovered == []
    # The training cluster's own name is static: its policies use KubeRay's ray.io/cluster label.
    training = [p for p in network_policies() if p["spec"]["podSelector"].get("matchLabels", {}).get("ray.io/cluster")]
    assert {p["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] for p in training} == {by_kind("RayCluster")["metadata"]["name"]}


ALLOWED = [
    # Each Ray cluster's pods, on every port: GCS, dashboard, Ray's own picked-at-start ports.
    ("oppen/cpu", "oppen/headgroup", "gcs-server"), ("oppen/gpu", "oppen/headgroup", "client"),
    ("oppen/headgroup", "oppen/cpu", WORKER_PORT), ("oppen/cpu", "oppen/gpu", WORKER_PORT),
    ("oppen-serve/serve", "oppen-serve/headgroup", "gcs-server"), ("oppen-serve/headgroup", "oppen-serve/serve", WORKER_PORT),
    ("llm/gpu", "llm/headgroup", "gcs-server"), ("llm/headgroup", "llm/gpu", WORKER_PORT),
    # The platform on the training head: Jobs API and the autoscaler through the GCS.
    ("dispatcher", "oppen/headgroup", "dashboard"), ("dispatcher", "oppen/headgroup", "gcs-server"),
    ("oppen-serve/headgroup", "oppen/headgroup", "dashboard"), ("oppen-serve/serve", "oppen/headgroup", "gcs-server"),
    # RayJob submitters and the operator on the Jobs API; the operator on Serve's proxy health.
    ("mnist submitter", "oppen/headgroup", "dashboard"), ("llm submitter", "llm/headgroup", "dashboard"),
    ("operator", "oppen/headgroup", "dashboard"), ("operator", "llm/headgroup", "dashboard"),
    ("operator", "oppen-serve/headgroup", "dashboard"), ("operator", "oppen-serve/headgroup", "serve"),
    # The ingress on Serve's HTTP port; Prometheus on metrics.
    ("ingress", "oppen-serve/headgroup", "serve"),
    ("prometheus", "oppen/headgroup", "metrics"), ("prometheus", "oppen/gpu", "metrics"),
    ("prometheus", "oppen-serve/headgroup", "metrics"), ("prometheus", "oppen-serve/serve", "metrics"),
]
DENIED = [
    # Serve's HTTP port: nobody but the ingress and the operator.
    ("stranger", "oppen-serve/headgroup", "serve"), ("outsider", "oppen-serve/headgroup", "serve"),
    ("dispatcher", "oppen-serve/headgroup", "serve"), ("oppen/cpu", "oppen-serve/headgroup", "serve"),
    ("mlflow", "oppen-serve/headgroup", "serve"),
    # The ingress and Prometheus reach nothing else.
    ("ingress", "oppen-serve/headgroup", "dashboard"), ("ingress", "oppen-serve/headgroup", "gcs-server"),
    ("ingress", "oppen/headgroup", "dashboard"), ("prometheus", "oppen/headgroup", "dashboard"),
    ("prometheus", "oppen/headgroup", "gcs-server"), ("prometheus", "oppen-serve/headgroup", "serve"),
    # No cluster into another's GCS or worker ports; the platform only to the training head's two ports.
    ("oppen/cpu", "oppen-serve/headgroup", "gcs-server"), ("oppen-serve/serve", "oppen/cpu", WORKER_PORT),
    ("llm/gpu", "oppen/headgroup", "gcs-server"), ("oppen/cpu", "llm/headgroup", "gcs-server"),
    ("dispatcher", "oppen/cpu", WORKER_PORT), ("dispatcher", "oppen/headgroup", "client"),
    ("dispatcher", "oppen-serve/headgroup", "gcs-server"), ("mlflow", "oppen/headgroup", "dashboard"),
    ("mnist submitter", "llm/headgroup", "dashboard"), ("mnist submitter", "oppen/headgroup", "gcs-server"),
    ("operator", "oppen/headgroup", "gcs-server"),
]


@pytest.mark.parametrize("allowed,src,dst,port", [(True, *c) for c in ALLOWED] + [(False, *c) for c in DENIED],
                         ids=lambda x: str(x))
def test_who_reaches_which_ray_port(allowed, src, dst, port):
    pods = all_pods()
    number = port if isinstance(port, int) else pods[dst].ports[port]  # the manifests' own port numbers
    assert reaches(pods[src], pods[dst], number) is allowed


def test_the_reachability_check_is_not_vacuous():
    # Where no policy selects it, the Serve head would answer anyone: what DENIED guards against.
    pods = all_pods()
    head = pods["oppen-serve/headgroup"]
    head.namespace = "elsewhere"
    assert reaches(pods["stranger"], head, head.ports["serve"])


def test_terraform_applies_the_policies_before_any_ray_pod_and_creates_the_tenant_tokens():
    main = load_tf(ROOT / "terraform" / "main.tf")
    assert "/network-policies.yaml" in blocks(main, "data")["kubectl_file_documents.network_policies"]["content"]
    resources = blocks(main, "resource")
    assert resources["kubectl_manifest.network_policies"]["for_each"] == \
        "${data.kubectl_file_documents.network_policies.manifests}"
    for ray in ("kubectl_manifest.ray_cluster", "kubectl_manifest.ray_service"):
        assert "${kubectl_manifest.network_policies}" in resources[ray]["depends_on"], ray
    assert "${kubernetes_secret_v1.tenant_tokens}" in resources["kubectl_manifest.ray_service"]["depends_on"]
    secret = resources["kubernetes_secret_v1.tenant_tokens"]
    assert secret["metadata"][0]["name"] == "oppen-tenant-tokens" and "random_password.tenant_tokens" in secret["data"]["tokens"]
    readme = (KUBERAY / "README.md").read_text()  # the same by hand
    assert "-f kuberay/network-policies.yaml" in readme and "create secret generic oppen-tenant-tokens" in readme
