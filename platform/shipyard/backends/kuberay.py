"""The kuberay backend: one ``ray.io/v1`` RayJob per job, through the official ``kubernetes`` client.

The KubeRay operator (and its CRDs) must be installed in the cluster; it turns each RayJob into a
RayCluster, waits for it, submits the entrypoint and, with ``shutdownAfterJobFinishes``, tears
the cluster down. This module only talks to the API server: what the RayJob looks like is
``kuberay_manifest.build_rayjob`` (a pure function), and how its status reads as a shipyard state
is :func:`map_status` (pure too).

Calls are synchronous (the official client is); the server's loop runs them in a thread. Every
call has a timeout, so a hung API server delays a poll but never blocks it forever.

The driver reports to the server like a local one: ``submit`` gets the server's variables for the
run (:class:`~shipyard.backends.base.JobEnv`, bound to the handle ``namespace/name``, which is
what the server stores and checks reports against). Their secret part (the report token) goes in
a Secret named after the RayJob, created *before* it (a head pod never starts without it) and
then given the RayJob as owner, so Kubernetes deletes it with the RayJob (cancel, TTL). A RayJob
create that fails deletes the Secret again; an owner patch that fails deletes both; a resubmit
that finds the RayJob (409) rewrites the Secret and owner and re-attaches.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from kubernetes import client, config as kube_config
from kubernetes.client.exceptions import ApiException

from shipyard.backends.base import BackendError, BackendStatus, Capacity, EnvFor, Handle, State, no_env
from shipyard.backends.kuberay_isolation import NP_GROUP, NP_PLURAL, NP_VERSION, network_policy, owned_by
from shipyard.backends.kuberay_manifest import (
    GROUP, JOB_ID, KUEUE_QUEUE, MANAGED_BY, PLURAL, RAYJOB, VERSION, KubeRayConfig, Resources, build_rayjob,
    namespace_of, node_allocatable, owner_reference, rayjob_name, rayjob_requests, report_secret,
)
from shipyard.errors import SpecError
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)
TIMEOUT_S = 30
SELECTOR = f"{MANAGED_BY}=shipyard,{JOB_ID}"


@dataclass(frozen=True)
class KubeApi:
    """One API the backend calls: named in its errors with the RBAC rule that grants a verb on it
    (a 403 says which rule is missing) and looked up in discovery on a 404 (which then says
    whether the API itself is missing or only the object or namespace)."""

    group: str          # "" is the core group
    version: str
    resource: str       # plural, with a subresource: "pods/log"
    what: str           # for messages: "the ray.io/v1 RayJob API"
    namespaced: bool = True
    grant: str = ""     # what in the Helm chart grants it

    def rule(self, verb: str) -> str:
        return f'apiGroups: ["{self.group}"], resources: ["{self.resource}"], verbs: ["{verb}"]'


RAYJOBS = KubeApi(GROUP, VERSION, PLURAL, f"the {GROUP}/{VERSION} RayJob API", grant="the chart's Role (rbac.create)")
NODES = KubeApi("", "v1", "nodes", "the core v1 Node API", namespaced=False,
                grant="the chart's ClusterRole (clusterRole.create)")
PODS = KubeApi("", "v1", "pods", "the core v1 Pod API", grant="the chart's Role (rbac.create)")
POD_LOGS = KubeApi("", "v1", "pods/log", "the core v1 Pod API", grant="the chart's Role (rbac.create)")
NETWORK_POLICIES = KubeApi(NP_GROUP, NP_VERSION, NP_PLURAL, f"the {NP_GROUP}/{NP_VERSION} NetworkPolicy API",
                           grant="the chart's Role (rbac.create), in every tenant namespace")
SECRETS = KubeApi("", "v1", "secrets", "the core v1 Secret API", grant="the chart's Role (rbac.create)")

KUEUE_WAITING = "KueueAdmission"
PENDING_DEPLOYMENT = ("", "New", "Initializing", "Waiting")
DONE_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed", "Suspended")
# Container states that keep a pod from ever running without someone fixing something.
STUCK_CONTAINER = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                   "CreateContainerError", "CrashLoopBackOff", "RunContainerError")


def map_status(obj: dict[str, Any]) -> BackendStatus:
    """A RayJob's ``status`` (jobDeploymentStatus: the operator's view of the cluster and
    submission; jobStatus: Ray's view of the driver) as one shipyard state."""
    st = obj.get("status") or {}
    dep, job = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""
    reason, message = st.get("reason") or "", st.get("message") or ""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return BackendStatus(State.STOPPED, "Deleted", "the RayJob is being deleted")
    if job == "SUCCEEDED" or (dep == "Complete" and job in ("", "SUCCEEDED")):
        return BackendStatus(State.SUCCEEDED, reason, message)
    if job == "FAILED" or dep in ("Failed", "ValidationFailed") or (dep == "Complete" and job != "STOPPED"):
        return BackendStatus(State.FAILED, reason or dep or "AppFailed", message or "the job failed")
    if job == "STOPPED":
        return BackendStatus(State.STOPPED, reason or "Stopped", message or "the Ray job was stopped")
    suspended = dep in ("Suspended", "Suspending") or (obj.get("spec") or {}).get("suspend")
    queue = ((obj.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE)
    if suspended and queue:
        # Kueue keeps its reason on the job's Workload object, not on the RayJob.
        ns = (obj.get("metadata") or {}).get("namespace") or ""
        return BackendStatus(State.PENDING, KUEUE_WAITING,
                             f"waiting for Kueue admission in queue {queue} (Kueue's reason: "
                             f"kubectl get workloads -n {ns} -o wide)")
    if suspended:
        return BackendStatus(State.STOPPED, "Suspended", message or "the RayJob is suspended")
    if job == "RUNNING":
        return BackendStatus(State.RUNNING, reason, message)
    what = {"Running": "the Ray cluster is up; the driver is starting",
            "Retrying": "the operator is retrying the submission"}.get(dep, "the Ray cluster is starting")
    return BackendStatus(State.PENDING, dep or "New", message or what)


def diagnose(pods: list[dict], events: list[dict]) -> tuple[str, str]:
    """Why pods do not run: a stuck container, an unschedulable pod, else the latest warning event.
    Returns (reason, message); ("", "") when nothing says."""
    for pod in pods:
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_CONTAINER:
                return waiting["reason"], (f"pod {pod['metadata']['name']}: container {cs.get('name')}: "
                                           f"{waiting['reason']}: {waiting.get('message') or ''}").rstrip(": ")
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", f"pod {pod['metadata']['name']}: {cond.get('message') or 'cannot be scheduled'}"
    warnings = [e for e in events if e.get("type") == "Warning"]
    if warnings:
        e = max(warnings, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        reason = "Unschedulable" if e.get("reason") == "FailedScheduling" else e.get("reason") or "Warning"
        obj = e.get("involvedObject") or {}
        return reason, f"{obj.get('kind', 'object')} {obj.get('name', '?')}: {e.get('message') or e.get('reason')}"
    return "", ""


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In a pod: the ServiceAccount's token; elsewhere: ``kubeconfig`` (default ~/.kube/config)."""
    if kubeconfig is None:
        try:
            cfg = client.Configuration()
            kube_config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except kube_config.ConfigException:
            pass
    return kube_config.new_client_from_config(config_file=kubeconfig, context=context)


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class KubeRayBackend:
    """:class:`~shipyard.backends.base.Backend` on Kubernetes. Handles are ``namespace/name``."""

    name = "kuberay"

    def __init__(self, config: KubeRayConfig, api_client: client.ApiClient | None = None,
                 clock: Callable[[], float] = time.time, packages=None):
        """``packages``: the server's :class:`~shipyard.packages.PackageStore`; jobs with a code
        package need it to be object storage (``--package-store s3://...``), which pods can read."""
        self.config = config
        self.packages = packages
        api = api_client or load_api_client()
        self._api = api
        self._custom = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self._clock = clock
        # Outcomes this instance decided and then deleted the RayJob for (cancel, init timeout).
        self._final: dict[Handle, BackendStatus] = {}
        self._network_policies_served = True  # until the API server says it has no NetworkPolicy API

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "KubeRayBackend":
        """From the server config file (the chart's ConfigMap): its ``kuberay:`` mapping."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls(KubeRayConfig.from_dict(raw.get("kuberay", raw)), **kwargs)

    # -- Backend -------------------------------------------------------------------------------

    @property
    def external_queue(self) -> str | None:
        """The Kueue queue that admits this backend's jobs, if any: the scheduler loop then hands
        every queued job straight to the backend and leaves capacity and gangs to Kueue."""
        return self.config.queue

    def check_package(self, spec: JobSpec) -> None:
        """SpecError unless this backend can run ``spec``'s code package (the API asks at submit)."""
        if spec.package is not None and (self.packages is None or not self.packages.remote):
            where = f"a local directory ({self.packages.root})" if self.packages is not None else "missing"
            raise SpecError(f"package: the kuberay backend runs code packages from object storage only, and this "
                            f"server's package store is {where}; start the server with --package-store "
                            "s3://bucket/prefix")

    def check_spec(self, spec: JobSpec) -> None:
        """SpecError unless this backend can place ``spec`` (the API asks at submit, so a job it
        cannot place is refused there, not failed by the scheduler): object-storage URIs only, a
        known pool, an allowed image, a code package it can fetch."""
        self.check_package(spec)
        build_rayjob("check", spec, "check", self.config)

    def submit(self, job_id: str, spec: JobSpec, tenant: str, run: int = 1, env: EnvFor = no_env) -> Handle:
        """One RayJob per job (its name is the job's): a requeued job's next run replaces it.
        With secret variables (the report token), their Secret first (see the module docstring)."""
        package_uri = None
        if spec.package is not None:
            try:
                self.check_package(spec)
            except SpecError as e:
                raise BackendError(f"job {job_id}: {e}") from None
            package_uri = self.packages.path_or_uri(tenant, spec.package)
        ns, name = namespace_of(self.config, tenant), rayjob_name(job_id)
        handle = f"{ns}/{name}"
        job_env = env(handle)
        try:
            body = build_rayjob(job_id, spec, tenant, self.config, package_uri=package_uri, env=job_env)
            secret = report_secret(body, job_env) if job_env.secret else None
        except (SpecError, ValueError) as e:  # a job queued before the server's config changed: fails its submit
            raise BackendError(f"job {job_id}: {e}") from None
        if secret is not None:
            self._put_secret(job_id, secret)
        try:
            # Strict: a field the installed CRD does not know fails the submit, naming the field,
            # instead of being dropped silently (the server's default since 1.27 only warns).
            created = self._custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body,
                                                                   field_validation="Strict", _request_timeout=TIMEOUT_S)
        except ApiException as e:
            if e.status != 409:
                if secret is not None:  # this job's (_put_secret checked), and no RayJob of its own
                    self._delete_secret(ns, secret["metadata"]["name"])
                raise self._error(f"create RayJob {ns}/{name}", e, RAYJOBS, "create", ns) from e
            existing = self._get(ns, name)
            owner = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(JOB_ID)
            if owner != job_id:
                if secret is not None:  # this job's (_put_secret checked), and no RayJob of its own
                    self._delete_secret(ns, secret["metadata"]["name"])
                raise BackendError(f"RayJob {ns}/{name} already exists for job {owner!r}, not {job_id!r}") from e
            if secret is not None:
                self._own_secret(secret, existing)  # failing, the next submit tries again
            self._isolate(body, ((existing or {}).get("metadata") or {}).get("uid"))
            return handle
        if secret is not None:
            try:
                self._own_secret(secret, created)
            except BackendError:
                try:
                    self._delete(ns, name)  # nothing of a failed submit is left behind
                except BackendError as e:
                    log.warning("%s; RayJob %s stays until it is deleted by hand", e, handle)
                self._delete_secret(ns, secret["metadata"]["name"])
                raise
        self._isolate(body, ((created or {}).get("metadata") or {}).get("uid"))
        return handle

    def status(self, handle: Handle) -> BackendStatus:
        ns, name = self._split(handle)
        obj = self._get(ns, name)
        if obj is None:
            return self._final.get(handle) or BackendStatus(
                State.FAILED, "NotFound", f"RayJob {handle} no longer exists (deleted by someone else, "
                f"or removed ttlSecondsAfterFinished={self.config.ttl_seconds_after_finished}s after it finished)")
        status = map_status(obj)
        dep = (obj.get("status") or {}).get("jobDeploymentStatus") or ""
        if status.state is State.PENDING and status.reason != KUEUE_WAITING and dep in PENDING_DEPLOYMENT \
                and self._age(obj) > self.config.init_timeout_s:
            reason, why = self._diagnose(ns, name, obj)
            status = BackendStatus(State.FAILED, reason or "InitializingTimeout",
                                   f"the Ray cluster did not start within {self.config.init_timeout_s}s"
                                   f"{f': {why}' if why else ''}")
            self._final[handle] = status
            self._delete(ns, name)  # release what the half-started cluster holds
        elif status.state is State.FAILED and "Deadline" in status.reason:
            reason, why = self._diagnose(ns, name, obj)
            if why:
                status = BackendStatus(State.FAILED, status.reason, f"{status.message}: {why}")
        return status

    def cancel(self, handle: Handle) -> None:
        ns, name = self._split(handle)
        # A suspended RayJob with a queue label is one Kueue would admit again: delete it.
        if self.config.cancel == "suspend" and not self.config.queue:
            try:
                self._custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": True}},
                                                            _request_timeout=TIMEOUT_S)
            except ApiException as e:
                if e.status != 404:
                    raise self._error(f"suspend RayJob {handle}", e, RAYJOBS, "patch") from e
        else:
            self._delete(ns, name)
        self._final[handle] = BackendStatus(State.STOPPED, "Cancelled", "cancelled by shipyard")

    def logs(self, handle: Handle, tail: int | None = 200) -> str:
        """The submitter pod's output: KubeRay's submitter (a Kubernetes Job named like the
        RayJob) follows the Ray job's logs, i.e. the launcher's output."""
        ns, name = self._split(handle)
        pods = [p for p in self._pods(ns, f"job-name={name}") if (p["metadata"].get("labels") or {}).get("job-name") == name]
        if not pods:
            return ""
        pod = max(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
        kwargs = {"tail_lines": tail} if tail is not None else {}
        try:
            return self._core.read_namespaced_pod_log(pod["metadata"]["name"], ns, _request_timeout=TIMEOUT_S, **kwargs)
        except ApiException as e:
            if e.status in (400, 404):  # container not started yet, or pod just gone
                return ""
            raise self._error(f"read logs of pod {ns}/{pod['metadata']['name']}", e, POD_LOGS, "get") from e

    def capacity(self) -> Capacity:
        """Nodes' allocatable resources (cordoned and not-Ready nodes excluded) minus what
        shipyard's unfinished RayJobs ask for (pending pods included: they are promised)."""
        try:
            nodes = self._core.list_node(_request_timeout=TIMEOUT_S).items
        except ApiException as e:
            raise self._error("list nodes for the cluster's capacity", e, NODES, "list") from e
        total = Resources()
        for node in nodes:
            total += node_allocatable(self._api.sanitize_for_serialization(node))
        held = Resources()
        for obj in self._list_rayjobs():
            if map_status(obj).state in (State.PENDING, State.RUNNING):
                held += rayjob_requests(obj)
        return Capacity(cpus=total.cpus, gpus=total.gpus, memory=total.memory,
                        free_cpus=max(0.0, total.cpus - held.cpus), free_gpus=max(0.0, total.gpus - held.gpus),
                        free_memory=max(0, total.memory - held.memory))

    def list_jobs(self) -> dict[str, Handle]:
        jobs = {}
        for obj in self._list_rayjobs():
            meta = obj["metadata"]
            job_id = (meta.get("annotations") or {}).get(JOB_ID) or meta["labels"][JOB_ID]
            jobs[job_id] = f"{meta.get('namespace') or self.config.namespace}/{meta['name']}"
        return jobs

    # -- API calls -----------------------------------------------------------------------------

    @staticmethod
    def _split(handle: Handle) -> tuple[str, str]:
        ns, sep, name = handle.partition("/")
        if not sep or not ns or not name:
            raise ValueError(f"not a kuberay handle (namespace/name): {handle!r}")
        return ns, name

    def _age(self, obj: dict[str, Any]) -> float:
        meta, st = obj.get("metadata") or {}, obj.get("status") or {}
        since = _timestamp(meta.get("creationTimestamp")) or _timestamp(st.get("startTime"))
        return 0.0 if since is None else self._clock() - since

    def _get(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self._custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, _request_timeout=TIMEOUT_S)
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._error(f"get RayJob {ns}/{name}", e, RAYJOBS, "get") from e

    def _delete(self, ns: str, name: str) -> None:
        try:
            self._custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Background",
                                                         _request_timeout=TIMEOUT_S)
        except ApiException as e:
            if e.status != 404:
                raise self._error(f"delete RayJob {ns}/{name}", e, RAYJOBS, "delete") from e

    def _isolate(self, rayjob: dict[str, Any], uid: str | None) -> None:
        """The job's NetworkPolicy (``kuberay_isolation.network_policy``), owned by its RayJob, so
        Kubernetes deletes it with the RayJob. Fails closed: when it cannot be created the RayJob
        is deleted and the submit fails. An API server without the NetworkPolicy API (a dev
        cluster) is warned about once and jobs run without."""
        if not self.config.network_policy or not self._network_policies_served:
            return
        ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
        try:
            if not uid:
                raise BackendError(f"cannot create NetworkPolicy {ns}/{name}: the API server sent RayJob {ns}/{name} "
                                   "without a metadata.uid to own it")
            self._create_network_policy(network_policy(rayjob, uid, self.config))
        except BackendError as e:
            try:
                self._delete(ns, name)
            except BackendError:
                pass  # the NetworkPolicy's error is the one to report
            raise BackendError(f"{e}; RayJob {ns}/{name} was deleted: a job does not run without its NetworkPolicy "
                               "(kuberay.network_policy: false turns them off)") from e

    def _create_network_policy(self, policy: dict[str, Any]) -> None:
        ns, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
        uid = policy["metadata"]["ownerReferences"][0]["uid"]
        for _ in range(2):  # a second time after removing a stale policy of an earlier RayJob
            try:
                self._custom.create_namespaced_custom_object(NP_GROUP, NP_VERSION, ns, NP_PLURAL, policy,
                                                             field_validation="Strict", _request_timeout=TIMEOUT_S)
                return
            except ApiException as e:
                if e.status == 404 and self._served(NETWORK_POLICIES) is False:
                    self._network_policies_served = False
                    log.warning("%s is not served by this Kubernetes API server: jobs run without a NetworkPolicy "
                                "(any pod can reach their Ray dashboard and Jobs API)", NETWORK_POLICIES.what)
                    return
                if e.status != 409:
                    raise self._error(f"create NetworkPolicy {ns}/{name}", e, NETWORK_POLICIES, "create", ns) from e
            try:
                existing = self._custom.get_namespaced_custom_object(NP_GROUP, NP_VERSION, ns, NP_PLURAL, name,
                                                                     _request_timeout=TIMEOUT_S)
            except ApiException as e:
                if e.status == 404:
                    continue  # deleted meanwhile: create again
                raise self._error(f"get NetworkPolicy {ns}/{name}", e, NETWORK_POLICIES, "get", ns) from e
            if owned_by(existing, uid):
                return  # this RayJob's, from an earlier submit
            if ((existing.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) != "shipyard":
                raise BackendError(f"cannot create NetworkPolicy {ns}/{name}: one of that name exists and is not "
                                   "shipyard's; rename or remove it")
            # An earlier RayJob's of the same name (a requeued job), not yet garbage-collected.
            try:
                self._custom.delete_namespaced_custom_object(
                    NP_GROUP, NP_VERSION, ns, NP_PLURAL, name, _request_timeout=TIMEOUT_S,
                    body={"preconditions": {"uid": existing["metadata"]["uid"]}})
            except ApiException as e:
                if e.status not in (404, 409):  # gone already, or replaced meanwhile: try again
                    raise self._error(f"delete NetworkPolicy {ns}/{name}", e, NETWORK_POLICIES, "delete", ns) from e
        raise BackendError(f"cannot create NetworkPolicy {ns}/{name}: it keeps being recreated by someone else")

    def _put_secret(self, job_id: str, secret: dict[str, Any]) -> None:
        """Create the job's report Secret, or bring one left by an earlier submit of this job up
        to date (its data replaced). A Secret of that name that is not this job's is never touched."""
        ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        try:
            self._core.create_namespaced_secret(ns, secret, _request_timeout=TIMEOUT_S)
            return
        except ApiException as e:
            if e.status != 409:
                raise self._error(f"create Secret {ns}/{name}", e, SECRETS, "create", ns) from e
        try:
            current = self._api.sanitize_for_serialization(
                self._core.read_namespaced_secret(name, ns, _request_timeout=TIMEOUT_S))
        except ApiException as e:
            raise self._error(f"get Secret {ns}/{name}", e, SECRETS, "get", ns) from e
        holder = ((current.get("metadata") or {}).get("annotations") or {}).get(JOB_ID)
        if holder != job_id:
            raise BackendError(f"Secret {ns}/{name} already exists for job {holder!r}, not {job_id!r}; "
                               "shipyard does not overwrite it")
        stale = {k: None for k in current.get("data") or {} if k not in secret["data"]}
        patch = {"metadata": {"labels": secret["metadata"]["labels"], "annotations": secret["metadata"]["annotations"]},
                 "data": {**stale, **secret["data"]}}
        self._patch_secret(ns, name, patch)

    def _own_secret(self, secret: dict[str, Any], rayjob: dict[str, Any] | None) -> None:
        """Make the RayJob the Secret's owner: Kubernetes then deletes it with the RayJob."""
        ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        try:
            ref = owner_reference(rayjob or {"metadata": {}})
        except ValueError as e:
            raise BackendError(f"cannot make Secret {ns}/{name} owned by its RayJob: {e}") from None
        self._patch_secret(ns, name, {"metadata": {"ownerReferences": [ref]}})

    def _patch_secret(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        try:
            self._core.patch_namespaced_secret(name, ns, patch, _request_timeout=TIMEOUT_S)
        except ApiException as e:
            raise self._error(f"patch Secret {ns}/{name}", e, SECRETS, "patch", ns) from e

    def _delete_secret(self, ns: str, name: str) -> None:
        """Best effort, on a failed submit's way out (its own error is the one raised)."""
        try:
            self._core.delete_namespaced_secret(name, ns, _request_timeout=TIMEOUT_S)
        except ApiException as e:
            if e.status != 404:
                log.warning("%s; the Secret stays until it is deleted by hand",
                            self._error(f"delete Secret {ns}/{name}", e, SECRETS, "delete", ns))
        except Exception as e:  # noqa: BLE001 - a connection error must not hide the submit's own
            log.warning("cannot delete Secret %s/%s (%s); it stays until it is deleted by hand", ns, name, e)

    def _list_rayjobs(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for ns in sorted({self.config.namespace, *self.config.namespaces.values()}):  # every tenant's
            try:
                items += self._custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector=SELECTOR,
                                                                    _request_timeout=TIMEOUT_S).get("items", [])
            except ApiException as e:
                raise self._error(f"list RayJobs in {ns}", e, RAYJOBS, "list") from e
        # The API server applies the selector; checking again costs nothing and keeps foreign
        # RayJobs out even behind a proxy or cache that ignores it.
        return [o for o in items if (o.get("metadata", {}).get("labels") or {}).get(MANAGED_BY) == "shipyard"
                and JOB_ID in o["metadata"]["labels"]]

    def _pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        try:
            pods = self._core.list_namespaced_pod(ns, label_selector=selector, _request_timeout=TIMEOUT_S).items
        except ApiException as e:
            raise self._error(f"list pods in {ns}", e, PODS, "list") from e
        return [self._api.sanitize_for_serialization(p) for p in pods]

    def _diagnose(self, ns: str, name: str, obj: dict[str, Any]) -> tuple[str, str]:
        """Best effort: pods or events that cannot be read (RBAC, an API server without the core
        API) leave the diagnosis empty, never the timeout unreported or the cluster held."""
        try:
            pods = [p for p in self._pods(ns, f"{RAYJOB}={name}") if (p["metadata"].get("labels") or {}).get(RAYJOB) == name]
        except BackendError:
            pods = []
        involved = {name, (obj.get("status") or {}).get("rayClusterName") or "", *(p["metadata"]["name"] for p in pods)}
        try:
            events = self._core.list_namespaced_event(ns, field_selector="type=Warning", _request_timeout=TIMEOUT_S).items
        except ApiException:
            events = []
        events = [e for e in (self._api.sanitize_for_serialization(e) for e in events)
                  if (e.get("involvedObject") or {}).get("name") in involved]
        return diagnose(pods, events)

    def _error(self, what: str, e: ApiException, api: KubeApi, verb: str, ns: str | None = None) -> BackendError:
        said = _server_message(e)
        if e.status == 403:
            where = f"a Role in namespace {ns or self.config.namespace}" if api.namespaced else "a ClusterRole"
            hint = (f"forbidden: the server's ServiceAccount needs the RBAC rule {{{api.rule(verb)}}} in {where} "
                    f"({api.grant} grants it); the API server said: {said}")
        elif e.status == 404 and self._served(api) is False:
            hint = f"{api.what} is not served here ({api.group or 'core'}/{api.version} has no {api.resource})"
            if api is RAYJOBS:
                hint += ": install the KubeRay operator and its CRDs"
            elif api is SECRETS:
                hint += ": each job's report token is kept in a Secret, which needs a full Kubernetes API server"
            elif api is NODES:
                hint += (f": capacity reads nodes from a full Kubernetes API server, with the RBAC rule "
                         f"{{{api.rule('list')}}} ({api.grant} grants it)")
        else:
            hint = said
        return BackendError(f"cannot {what}: HTTP {e.status}: {hint}")

    def _served(self, api: KubeApi) -> bool | None:
        """Whether discovery lists ``api``'s resource: False when its group/version or the
        resource is missing, None when discovery cannot say (it failed too)."""
        try:
            if api.group:
                found = self._custom.get_api_resources(api.group, api.version, _request_timeout=TIMEOUT_S)
            else:
                found = self._core.get_api_resources(_request_timeout=TIMEOUT_S)
        except ApiException as e:
            return False if e.status == 404 else None
        except Exception:  # noqa: BLE001 - a hint is best effort; the original error is raised anyway
            return None
        return api.resource in {r.name for r in found.resources or []}


def _server_message(e: ApiException) -> str:
    """The Status message of an API error (its body is a JSON Status), else the body as sent."""
    try:
        message = json.loads(e.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return (message or e.body or e.reason or "").strip()[:500]


__all__ = ["KubeRayBackend", "KubeRayConfig", "diagnose", "load_api_client", "map_status", "rayjob_name"]
