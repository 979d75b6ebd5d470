"""What keeps one job's Ray cluster apart from everyone else's on Kubernetes: pure builders, like
``kuberay_manifest`` (the API calls are ``kuberay.py``'s).

A job's NetworkPolicy (``networking.k8s.io/v1``) is named like its RayJob, lives in its namespace
and is owned by the RayJob (``ownerReferences`` with the RayJob's uid), so Kubernetes' garbage
collector deletes it with the RayJob: cancel, the init timeout and KubeRay's TTL need no second
delete. It selects the job's pods (``shipyard.io/rayjob: <name>``, on the head and every worker)
and admits, ingress only:

- the job's own pods, on every port (GCS, raylets, object transfer, NCCL/Gloo between ranks);
- on the dashboard port only (8265: the Ray dashboard and the Jobs API), three clients:

  - KubeRay's submitter pod (K8sJobMode): KubeRay names the submitter Kubernetes Job like the
    RayJob, and the Job controller labels its pods ``batch.kubernetes.io/job-name: <job name>``
    (Kubernetes >= 1.27; KubeRay before 1.7 adds no label of its own to the submitter). Peers
    without a namespaceSelector match pods of the policy's own namespace only, and a namespace
    holds one Job of that name, so no other job's submitter gets in;
  - the KubeRay operator, which polls the head's Jobs API for the job's status: pods labelled
    ``operator_labels`` in ``operator_namespace`` (default ``app.kubernetes.io/name:
    kuberay-operator`` in ``ray-system``, where KubeRay's docs install it);
  - the shipyard server: pods labelled ``server_labels`` in ``server_namespace`` (the chart
    renders its own selector labels and the release namespace).

Namespaces are matched by ``kubernetes.io/metadata.name``, a label the API server sets on every
namespace and nobody can change, so a tenant cannot make its namespace look like the operator's.
Egress is not restricted: pods fetch from object storage, pip indexes and the report endpoint.
Nothing else reaches the dashboard or the Jobs API (no Service of type LoadBalancer, no Ingress).
The policy only holds where the cluster's CNI enforces NetworkPolicies (Calico, Cilium, GKE
Dataplane V2...); kind's default CNI does not.
"""

from __future__ import annotations

from typing import Any

from shipyard.backends.kuberay_manifest import GROUP, JOB_ID, MANAGED_BY, RAYJOB, TENANT, VERSION, KubeRayConfig

NP_GROUP, NP_VERSION, NP_PLURAL = "networking.k8s.io", "v1", "networkpolicies"
JOB_NAME = "batch.kubernetes.io/job-name"     # set by the Job controller on a Job's pods
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by the API server on every namespace
DASHBOARD_PORT = 8265  # Ray's default dashboard-port; build_rayjob does not change it


def _peer(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: namespace}},
            "podSelector": {"matchLabels": dict(labels)}}


def network_policy(rayjob: dict[str, Any], uid: str, config: KubeRayConfig) -> dict[str, Any]:
    """The NetworkPolicy of the RayJob ``rayjob`` (as ``build_rayjob`` made it), owned by the
    RayJob object whose ``metadata.uid`` is ``uid`` (from the API server's create response)."""
    if not uid:
        raise ValueError("uid: the RayJob's metadata.uid is needed to own its NetworkPolicy")
    meta = rayjob["metadata"]
    name, ns = meta["name"], meta["namespace"]
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k in (MANAGED_BY, JOB_ID, TENANT)}
    clients = [
        {"podSelector": {"matchLabels": {JOB_NAME: name}}},
        _peer(config.operator_namespace, config.operator_labels),
        _peer(config.server_namespace or config.namespace, config.server_labels),
    ]
    return {
        "apiVersion": f"{NP_GROUP}/{NP_VERSION}", "kind": "NetworkPolicy",
        "metadata": {
            "name": name, "namespace": ns, "labels": {**labels, RAYJOB: name},
            # No blockOwnerDeletion: setting it needs update on rayjobs/finalizers, and the
            # background deletion the backend uses does not wait for dependents anyway.
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": name, "uid": uid}],
        },
        "spec": {
            "podSelector": {"matchLabels": {RAYJOB: name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {RAYJOB: name}}}]},
                {"from": clients, "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def owned_by(policy: dict[str, Any], uid: str) -> bool:
    """Whether an existing NetworkPolicy (as read from the API) belongs to the RayJob ``uid``."""
    return any(r.get("uid") == uid for r in (policy.get("metadata") or {}).get("ownerReferences") or [])


__all__ = ["DASHBOARD_PORT", "JOB_NAME", "NAMESPACE_NAME", "NP_GROUP", "NP_PLURAL", "NP_VERSION", "network_policy", "owned_by"]
