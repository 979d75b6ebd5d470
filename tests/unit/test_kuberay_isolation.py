"""A job's isolation objects on Kubernetes: its NetworkPolicy, checked against the Kubernetes 1.31
schema (kubernetes-validate, strict) and by evaluating its peers on label dicts the way a CNI
does; the tenant's own S3 Secret."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shipyard.backends.kuberay_isolation import DASHBOARD_PORT, JOB_NAME, NAMESPACE_NAME, network_policy, owned_by
from shipyard.backends.kuberay_manifest import JOB_ID, MANAGED_BY, RAYJOB, KubeRayConfig, build_rayjob, rayjob_name

from test_kuberay_manifest import CONFIG, make_spec, strategy_kinds, worker_group

K8S_VERSION = "1.31.0"
UID = "5f0c6d1e-8a3b-4c2d-9e7f-1a2b3c4d5e6f"
CONFIG_NS = KubeRayConfig(**{**CONFIG.__dict__, "namespaces": {"team-a": "team-a-jobs", "team-b": "team-b-jobs"},
                             "server_namespace": "shipyard",
                             "server_labels": {"app.kubernetes.io/name": "shipyard", "app.kubernetes.io/instance": "sy"}})


def policy_for(job_id: str = "job-1", tenant: str = "team-a", config: KubeRayConfig = CONFIG_NS, **spec) -> dict:
    return network_policy(build_rayjob(job_id, make_spec(**spec), tenant, config), UID, config)


# -- NetworkPolicy semantics, as a CNI applies them, on label dicts ------------------------------

@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)

    @property
    def ns_labels(self) -> dict[str, str]:
        return {**self.namespace_labels, NAMESPACE_NAME: self.namespace}  # the API server sets it


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpression holds; {} selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    assert "ipBlock" not in peer
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], pod.ns_labels)
    else:
        ns_ok = pod.namespace == policy_ns  # a podSelector alone: the policy's namespace only
    return ns_ok and selects(peer.get("podSelector") or {}, pod.labels)


def admits(policy: dict, src: Pod, dst: Pod, port: int) -> bool:
    """Whether ``src`` may open a TCP connection to ``dst``:``port`` under this one policy."""
    ns = policy["metadata"]["namespace"]
    if dst.namespace != ns or not selects(policy["spec"]["podSelector"], dst.labels):
        return True  # not a pod this policy isolates
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports):
            continue
        peers = rule.get("from")
        if not peers or any(peer_matches(peer, ns, src) for peer in peers):
            return True
    return False


def test_the_evaluator_can_say_yes_and_no():
    """Not vacuous: a rule from all pods admits a stranger; a rule from none admits nobody."""
    stranger, dst = Pod("elsewhere", {"app": "x"}), Pod("n", {"a": "b"})
    base = {"metadata": {"namespace": "n"}, "spec": {"podSelector": {"matchLabels": {"a": "b"}}, "policyTypes": ["Ingress"]}}
    assert admits({**base, "spec": {**base["spec"], "ingress": [{}]}}, stranger, dst, 1)
    assert not admits({**base, "spec": {**base["spec"], "ingress": []}}, stranger, dst, 1)
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}, {"a": "b"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {})


# -- the job's NetworkPolicy ---------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [0.0, 1.0], ids=["cpu", "gpu"])
@pytest.mark.parametrize("kind", strategy_kinds())
def test_the_network_policy_validates_and_is_the_same_for_every_strategy(kind, gpus):
    import kubernetes_validate

    policy = policy_for(kind=kind, gpus=gpus)
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy == policy_for()  # nothing in it depends on the strategy or the devices


def test_kubernetes_validate_is_not_vacuous():
    import kubernetes_validate

    policy = policy_for()
    policy["spec"]["ingress"][1]["ports"][0]["port"] = [DASHBOARD_PORT]  # int-or-string, not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    policy = policy_for()
    policy["spec"]["podSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_the_policy_is_named_placed_and_owned_like_its_rayjob():
    rayjob = build_rayjob("job-1", make_spec(), "team-a", CONFIG_NS)
    policy = network_policy(rayjob, UID, CONFIG_NS)
    meta = policy["metadata"]
    assert (meta["name"], meta["namespace"]) == (rayjob["metadata"]["name"], "team-a-jobs")
    # The garbage collector deletes it with the RayJob whose uid it names.
    assert meta["ownerReferences"] == [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": rayjob_name("job-1"), "uid": UID}]
    assert owned_by(policy, UID) and not owned_by(policy, "another-uid")
    assert meta["labels"][MANAGED_BY] == "shipyard" and meta["labels"][JOB_ID] == "job-1"
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress open: S3, pip, the report endpoint
    # It isolates exactly the pods build_rayjob labels: the head and every worker.
    for tmpl in (rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"], worker_group(rayjob)["template"]):
        assert selects(policy["spec"]["podSelector"], tmpl["metadata"]["labels"])
    with pytest.raises(ValueError, match="uid"):
        network_policy(rayjob, "", CONFIG_NS)


NAME = rayjob_name("job-1")
HEAD = Pod("team-a-jobs", {RAYJOB: NAME, "ray.io/node-type": "head"})
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
SERVER = {"app.kubernetes.io/name": "shipyard", "app.kubernetes.io/instance": "sy", "app.kubernetes.io/component": "server"}


@pytest.mark.parametrize("who, src, gcs, dashboard", [
    ("its own worker", Pod("team-a-jobs", {RAYJOB: NAME, "ray.io/node-type": "worker"}), True, True),
    ("its submitter", Pod("team-a-jobs", {JOB_NAME: NAME, "job-name": NAME}), False, True),
    ("the KubeRay operator", Pod("ray-system", OPERATOR), False, True),
    ("the shipyard server", Pod("shipyard", SERVER), False, True),
    ("another job's pod, same namespace", Pod("team-a-jobs", {RAYJOB: rayjob_name("job-2")}), False, False),
    ("another job's submitter", Pod("team-a-jobs", {JOB_NAME: rayjob_name("job-2")}), False, False),
    ("a pod of the same name in another tenant's namespace", Pod("team-b-jobs", {RAYJOB: NAME}), False, False),
    ("a submitter-named pod in another namespace", Pod("team-b-jobs", {JOB_NAME: NAME}), False, False),
    ("an operator look-alike in a tenant namespace", Pod("team-b-jobs", OPERATOR), False, False),
    ("a server look-alike in a tenant namespace", Pod("team-a-jobs", SERVER), False, False),
    ("a namespace labelled like the operator's",
     Pod("team-b-jobs", OPERATOR, {"name": "ray-system", "app.kubernetes.io/name": "kuberay-operator"}), False, False),
    ("another pod in the operator's namespace", Pod("ray-system", {"app.kubernetes.io/name": "grafana"}), False, False),
    ("another pod in the server's namespace", Pod("shipyard", {"app.kubernetes.io/name": "postgresql"}), False, False),
])
def test_only_the_job_its_submitter_the_operator_and_the_server_reach_its_pods(who, src, gcs, dashboard):
    policy = policy_for()
    assert admits(policy, src, HEAD, 6379) is gcs, f"{who} on the GCS port"
    assert admits(policy, src, HEAD, DASHBOARD_PORT) is dashboard, f"{who} on the dashboard / Jobs API port"
    assert admits(policy, src, HEAD, 10001) is gcs, f"{who} on the Ray client port"


def test_the_operator_and_server_selectors_come_from_the_config():
    config = KubeRayConfig(**{**CONFIG_NS.__dict__, "operator_namespace": "kuberay",
                              "operator_labels": {"app.kubernetes.io/name": "kuberay-operator", "team": "platform"}})
    policy = policy_for(config=config)
    assert admits(policy, Pod("kuberay", {**OPERATOR, "team": "platform"}), HEAD, DASHBOARD_PORT)
    assert not admits(policy, Pod("kuberay", OPERATOR), HEAD, DASHBOARD_PORT)  # all its labels are needed
    assert not admits(policy, Pod("ray-system", {**OPERATOR, "team": "platform"}), HEAD, DASHBOARD_PORT)
    # Without server_namespace the server is looked for in the default job namespace.
    default = KubeRayConfig(image="i", namespace="jobs")
    policy = network_policy(build_rayjob("job-1", make_spec(), "t", default), UID, default)
    assert admits(policy, Pod("jobs", {"app.kubernetes.io/name": "shipyard"}), Pod("jobs", {RAYJOB: NAME}), DASHBOARD_PORT)


@pytest.mark.parametrize("changes, message", [
    ({"operator_namespace": "Ray_System"}, "operator_namespace: got 'Ray_System'; a namespace is a DNS label"),
    ({"server_namespace": ""}, "server_namespace: got ''"),
    ({"operator_labels": {"app.kubernetes.io/name": "kuberay operator"}}, "operator_labels: 'app.kubernetes.io/name'"),
    ({"server_labels": {"bad key!": "x"}}, "server_labels: 'bad key!'"),
    ({"server_labels": {f"k{i}": "v" for i in range(17)}}, "server_labels: .* at most 16 labels"),
    ({"s3_secrets": {"team-a": "Team_A/keys"}}, "s3_secrets.team-a: got 'Team_A/keys'; a Secret name is a DNS subdomain"),
    ({"s3_secrets": {"team-a": "a" * 254}}, "s3_secrets.team-a: .* at most 253"),
])
def test_bad_isolation_settings_fail_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        KubeRayConfig.from_dict({"image": "i", **changes})


# -- the tenant's own S3 Secret ------------------------------------------------------------------

def env_from(rayjob: dict) -> list:
    pods = (rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"], worker_group(rayjob)["template"])
    return [p["spec"]["containers"][0].get("envFrom") for p in pods]


def test_a_listed_tenant_gets_its_own_s3_secret_and_the_others_the_shared_one():
    config = KubeRayConfig.from_dict({"image": "i", "s3_secret": "shipyard-s3", "namespaces": {"team-a": "team-a-jobs"},
                                      "s3_secrets": {"team-a": "team-a-s3"}})
    own = build_rayjob("job-1", make_spec(), "team-a", config)
    assert own["metadata"]["namespace"] == "team-a-jobs"  # where the Secret must be
    assert env_from(own) == [[{"secretRef": {"name": "team-a-s3"}}]] * 2  # head and workers; never the shared one
    shared = build_rayjob("job-2", make_spec(), "team-b", config)
    assert env_from(shared) == [[{"secretRef": {"name": "shipyard-s3"}}]] * 2
    # Without a shared Secret (workload identity), a tenant not listed gets none, a listed one its own.
    config = KubeRayConfig.from_dict({"image": "i", "s3_secrets": {"team-a": "team-a-s3"}})
    assert env_from(build_rayjob("job-3", make_spec(), "team-b", config)) == [None, None]
    assert env_from(build_rayjob("job-4", make_spec(), "team-a", config)) == [[{"secretRef": {"name": "team-a-s3"}}]] * 2
