"""The RayJob a job becomes on Kubernetes: a pure function of (job id, spec, tenant, config).

Kept apart from the API calls (``kuberay.py``) so the object can be checked against KubeRay's
CRD schema without a cluster. Shape of the RayJob:

- head group: runs the driver (``shipyard run``, see ``base.entrypoint_command``) and nothing
  else (``num-cpus: 0``), so every training rank lands on a worker pod;
- one worker group, ``replicas = workers.count``: one pod per rank, requests = limits =
  ``workers.cpus`` CPU, the worker memory and ``ceil(workers.gpus)`` ``nvidia.com/gpu``
  (a device plugin hands out whole GPUs; a fractional ``workers.gpus`` still gets one per pod);
- an elastic job (``workers: {min, max}``) gets a worker group of ``minReplicas = replicas =
  min``, ``maxReplicas = max`` and Ray's in-tree autoscaler (``enableInTreeAutoscaling``): Ray
  Train's elastic policy asks the autoscaler for ``max`` workers' resources, the autoscaler adds
  pods as the nodes allow, and the job grows into them (``runtime/elastic.py``);
- every pod's ``terminationGracePeriodSeconds`` covers ``checkpoint.preemption_grace_s`` plus a
  margin, so an evicted pod commits its checkpoint before Kubernetes kills it;
- a tenant listed in the config's ``namespaces`` gets its RayJobs in its own namespace;
- with ``queue`` in the config (a Kueue LocalQueue), the RayJob is labelled
  ``kueue.x-k8s.io/queue-name`` and created suspended: Kueue admits it as one gang and
  unsuspends it (shipyard's scheduler hands such jobs over without its own capacity checks);
- every pod non-root with no privilege escalation and no capabilities (``POD_SECURITY``);
- GPU workers go to a node pool (nodeSelector, tolerations, affinity) from the server config;
- S3 credentials come from a Secret through ``envFrom`` on every container: the tenant's own
  (``s3_secrets``) or the shared one (``s3_secret``);
- the server's variables for the run (:class:`~shipyard.backends.base.JobEnv`) go on the head
  container only, where the driver runs: ``plain`` ones (report URL, storage roots) as values,
  ``secret`` ones (the report token, the tenant's own variables) as ``secretKeyRef`` of the
  job's report Secret (:func:`report_secret`, named ``<rayjob>-report``, labelled like the
  RayJob and owned by it, so Kubernetes deletes it with the RayJob): nothing secret is in the
  RayJob. The driver forwards what its workers need (``SHIPYARD_*``, ``AWS_*``) through Ray;
- values shipyard computes (the spec, the server's variables) are escaped for the kubelet, which
  would otherwise expand ``$(NAME)`` in them; the config's own ``env`` is passed as written;
- stopping the driver: ``RAY_JOB_STOP_SIGNAL=SIGINT`` on the head container reaches Ray's job
  supervisor (KubeRay stops the Ray job when the RayJob is deleted), see
  :func:`~shipyard.backends.base.driver_env`. An evicted or deleted head pod is another path:
  the kubelet signals only the container's PID 1 (``ray start --block``, which tears Ray down
  and with it the driver, SIGKILLed by its supervisor's watcher), never the driver. So the head
  container has a ``preStop`` hook (:data:`PRESTOP`) that sends the driver, found through its
  pid file, the same SIGINT and waits for it to exit: its workers checkpoint, it reports the
  run preempted, and only then does Kubernetes SIGTERM PID 1. The grace period covers both;
- the job's code: with ``package_uri`` (the uploaded code package in object storage), the
  RayJob's ``runtimeEnvYAML`` makes it the job's ``working_dir``, every pod downloads and unpacks
  it, and the driver's spec says ``workdir: .``; without one the spec's ``workdir`` is used as
  given, a directory of the worker image.

Spec fields this backend would use but the JobSpec does not have yet are read with ``getattr``
and fall back to the config: ``image``, ``workers.memory``, ``workers.pool``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Literal

import yaml

from shipyard.scheduler.snapshot import Resources  # the scheduler's unit: cpus, gpus, memory bytes
from shipyard.backends.base import (
    DRIVER_ENV_NAMES, DRIVER_PIDFILE_ENV, SPEC_ENV, JobEnv, driver_env, entrypoint_command, spec_json,
)
from shipyard.errors import SpecError
from shipyard.spec import JobSpec, is_remote_uri

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
GPU = "nvidia.com/gpu"
MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_ID = "shipyard.io/job-id"
TENANT = "shipyard.io/tenant"
RAYJOB = "shipyard.io/rayjob"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Beyond checkpoint.preemption_grace_s (the ranks' time to commit after SIGTERM), a pod needs time
# for what follows the commit: the driver recording the attempt as preempted, Ray's own shutdown
# and the container runtime's stop. Kubernetes SIGKILLs at the end of the period, whatever is left.
GRACE_MARGIN_S = 30
# Every job pod, as the chart's server pod (helm/shipyard/values.yaml): non-root, no privilege
# escalation, no capabilities, the runtime's seccomp profile. No runAsUser: the image's numeric
# USER is kept (the worker image's is 1000); an image whose USER is root or a name fails to start
# with CreateContainerConfigError, which the Initializing diagnosis reports. The root filesystem
# stays writable: Ray writes its session under /tmp/ray.
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
MAX_NAME = 47  # KubeRay: RayJob names longer than this fail validation (cluster name = name + 6)
MAX_SELECTOR_LABELS = 16
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_SECRET_BYTES = 256 * 1024  # Kubernetes refuses a Secret over 1 MiB; a job's variables are a few KiB
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,252}")  # a portable variable name, also a valid Secret key
DRIVER_PIDFILE = "/tmp/shipyard-driver.pid"  # written by the driver (runtime/report.py), read by PRESTOP
# The head container's preStop hook: the driver's own stop (SIGINT, as Ray's supervisor sends it),
# then wait until it has exited. The pid file holds "<pid> <start time>" (field 22 of
# /proc/<pid>/stat): a pid the driver left behind that now names another process, or none, is
# left alone. POSIX sh builtins only (the image need not have procps).
PRESTOP = (f'f="${{{DRIVER_PIDFILE_ENV}:-}}"; [ -n "$f" ] && [ -r "$f" ] || exit 0; '
           'read -r pid start < "$f"; case "$pid.$start" in .*|*.|*[!0-9.]*) exit 0;; esac; '
           'alive() { read -r s 2>/dev/null < "/proc/$pid/stat" || return 1; s=${s##*) }; '
           'set -- $s; [ "${20}" = "$start" ]; }; '
           'alive || exit 0; kill -INT "$pid" 2>/dev/null || exit 0; while alive; do sleep 1; done')


@dataclass(frozen=True)
class NodePool:
    """Where one kind of pod may run: copied into the pod template as given."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None


@dataclass(frozen=True)
class KubeRayConfig:
    """The server's settings for the kuberay backend (the Helm chart's ConfigMap, ``kuberay:``)."""

    image: str                                   # worker image: Ray + torch + shipyard
    namespace: str = "default"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None           # for the Ray pods; None: the namespace default
    ray_version: str = "2.60.0"
    head_cpus: str = "1"
    head_memory: str = "4Gi"
    worker_memory: str = "8Gi"                   # per worker pod, until the spec has workers.memory
    shm_size: str | None = "2Gi"                 # /dev/shm for NCCL and data loaders; None: none
    pools: dict[str, NodePool] = field(default_factory=dict)
    gpu_pool: str | None = None                  # pool for GPU workers when the spec names none
    cpu_pool: str | None = None                  # pool for the head and CPU workers
    s3_secret: str | None = None                 # Secret with AWS_* keys, mounted with envFrom
    env: dict[str, str] = field(default_factory=dict)   # e.g. SHIPYARD_S3_ENDPOINT
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int | None = None
    init_timeout_s: int = 600                    # Initializing longer than this: FAILED with the reason
    cancel: Literal["delete", "suspend"] = "delete"  # with a queue, always delete (Kueue owns suspend)
    queue: str | None = None                     # a Kueue LocalQueue in the namespace: Kueue admits
    # Images a spec may name (``image:``); an entry ending in ``*`` is a prefix. Empty: any image.
    # The server's own ``image`` is always allowed.
    images: tuple[str, ...] = ()
    namespaces: dict[str, str] = field(default_factory=dict)  # tenant -> its own namespace; others: namespace
    # tenant -> its own S3 Secret (AWS_* keys), in that tenant's namespace (envFrom reads a Secret
    # of the pod's namespace only); its pods get it instead of s3_secret. Others: s3_secret.
    s3_secrets: dict[str, str] = field(default_factory=dict)
    # A NetworkPolicy per job (kuberay_isolation.py): ingress to its pods only from its own pods,
    # and on the dashboard port from its submitter, the operator's pods and the server's pods.
    network_policy: bool = True
    operator_namespace: str = "ray-system"       # where the KubeRay operator runs (KubeRay's docs)
    operator_labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"})
    server_namespace: str | None = None          # where the shipyard server runs; None: namespace
    server_labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "shipyard"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "KubeRayConfig":
        """Build from the ConfigMap's YAML (snake_case keys); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"kuberay config: unknown keys {unknown}; allowed: {sorted(known)}")
        raw = dict(raw)
        raw["pools"] = {k: NodePool(**v) for k, v in (raw.get("pools") or {}).items()}
        raw["image_pull_secrets"] = tuple(raw.get("image_pull_secrets") or ())
        raw["images"] = tuple(raw.get("images") or ())
        return cls(**raw)

    def __post_init__(self) -> None:
        names = {f"namespaces.{t}": ns for t, ns in self.namespaces.items()}
        names["operator_namespace"] = self.operator_namespace
        if self.server_namespace is not None:
            names["server_namespace"] = self.server_namespace
        for key, ns in names.items():
            if not isinstance(ns, str) or not DNS_LABEL.fullmatch(ns):
                raise ValueError(f"kuberay config: {key}: got {ns!r}; a namespace is a DNS label "
                                 "(lowercase letters, digits and -, at most 63)")
        for tenant, secret in self.s3_secrets.items():
            if not isinstance(secret, str) or len(secret) > 253 or not DNS_SUBDOMAIN.fullmatch(secret):
                raise ValueError(f"kuberay config: s3_secrets.{tenant}: got {secret!r}; a Secret name is a DNS "
                                 "subdomain (lowercase letters, digits, - and ., at most 253)")
        for key in ("operator_labels", "server_labels"):
            labels = getattr(self, key)
            if not isinstance(labels, dict) or len(labels) > MAX_SELECTOR_LABELS:
                raise ValueError(f"kuberay config: {key}: got {labels!r}; a mapping of at most "
                                 f"{MAX_SELECTOR_LABELS} labels")
            for k, v in labels.items():
                if not is_label_key(k) or not isinstance(v, str) or label_value(v) != v:
                    raise ValueError(f"kuberay config: {key}: {k!r}: {v!r} is not a Kubernetes label "
                                     "(key [prefix/]name, value at most 63 alphanumerics, -, _ or .)")
        for key in ("gpu_pool", "cpu_pool"):
            pool = getattr(self, key)
            if pool and pool not in self.pools:
                raise ValueError(f"kuberay config: {key} {pool!r} is not in pools {sorted(self.pools)}")


def namespace_of(config: KubeRayConfig, tenant: str) -> str:
    """Where a tenant's RayJobs live: its own namespace when the config gives one, so Kubernetes
    RBAC, ResourceQuotas and NetworkPolicies can separate tenants."""
    return config.namespaces.get(tenant, config.namespace)


def s3_secret_of(config: KubeRayConfig, tenant: str) -> str | None:
    """The Secret a tenant's pods get their S3 credentials from: its own when the config gives
    one (so one tenant's jobs cannot use another's keys), else the shared ``s3_secret``."""
    return config.s3_secrets.get(tenant, config.s3_secret)


def is_label_key(key: Any) -> bool:
    """A Kubernetes label key: ``[prefix/]name``, name <= 63 chars, prefix a DNS subdomain <= 253."""
    if not isinstance(key, str):
        return False
    prefix, _, name = key.rpartition("/")
    return (re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", name) is not None
            and (not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.fullmatch(prefix) is not None)))


def rayjob_name(job_id: str) -> str:
    """A DNS-1035 name of at most 47 characters, stable for a job id (so submit is idempotent)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    name = f"sy-{slug}"
    if slug != job_id or len(name) > MAX_NAME:
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


def label_value(value: str) -> str:
    """A valid label value (63 chars, alphanumeric ends); the exact value is kept in an annotation."""
    v = re.sub(r"^[^A-Za-z0-9]+", "", re.sub(r"[^A-Za-z0-9_.-]+", "-", value))[:63]
    return re.sub(r"[^A-Za-z0-9]+$", "", v)


def report_secret_name(rayjob: str) -> str:
    """The job's report Secret: the RayJob's name (at most 47) and ``-report``."""
    return f"{rayjob}-report"


def k8s_literal(value: str) -> str:
    """``value`` as a container env value the kubelet leaves as is: it expands ``$(NAME)`` and
    reduces ``$$`` to ``$``, so every ``$`` is doubled."""
    return value.replace("$", "$$")


def check_job_env(env: JobEnv) -> None:
    """ValueError unless the server's variables can travel as env values and Secret keys."""
    fixed = {SPEC_ENV, DRIVER_PIDFILE_ENV, *DRIVER_ENV_NAMES}
    for name in (*env.plain, *env.secret):
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"job env: variable {name[:100]!r} is not a valid name (letters, digits and _, "
                             "not starting with a digit, at most 253): check the tenant's env file")
        if name in fixed:
            raise ValueError(f"job env: {name} is set by the backend itself")
    size = sum(len(k) + len(v.encode()) for k, v in env.secret.items())
    if size > MAX_SECRET_BYTES:
        raise ValueError(f"job env: the secret variables are {size} bytes; at most {MAX_SECRET_BYTES} "
                         "(check the tenant's env file)")


def check_spec(spec: JobSpec) -> None:
    """Pods cannot read the submitter's local paths: data and checkpoints must be object storage."""
    uris = {"dataset.uri": spec.dataset.uri, "dataset.eval_uri": spec.dataset.eval_uri,
            "checkpoint.uri": spec.checkpoint.uri if spec.checkpoint else None}
    for name, uri in uris.items():
        if uri is not None and not is_remote_uri(uri):
            raise SpecError(f"{name}: got {uri!r}; jobs on Kubernetes read and write object storage, "
                            f"use an s3:// URI")


def check_image(image: str, config: KubeRayConfig) -> None:
    """An admin-set allowlist: a spec cannot run an arbitrary image on the cluster's nodes."""
    allowed = (config.image, *config.images)
    if not config.images or any(image == a or (a.endswith("*") and image.startswith(a[:-1])) for a in allowed):
        return
    raise SpecError(f"image: got {image!r}; this server allows only {', '.join(allowed)} "
                    f"(leave image out for the default)")


def _pool(config: KubeRayConfig, name: str | None) -> NodePool:
    if name is None:
        return NodePool()
    if name not in config.pools:
        raise SpecError(f"workers.pool: got {name!r}; this server's pools are: {', '.join(sorted(config.pools)) or 'none'}")
    return config.pools[name]


def _cpu(value: float) -> str:
    return f"{round(value * 1000)}m" if value != int(value) else str(int(value))


def _pod(config: KubeRayConfig, *, name: str, image: str, resources: dict, pool: NodePool,
         labels: dict[str, str], env: dict[str, str], grace_s: int, s3_secret: str | None,
         secret_env: tuple[str, tuple[str, ...]] | None = None, pre_stop: str | None = None) -> dict[str, Any]:
    """``secret_env``: (Secret name, the variables read from it, one key each)."""
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": config.image_pull_policy,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": dict(CONTAINER_SECURITY),
    }
    if secret_env is not None:
        secret, names = secret_env
        container["env"] += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in names]
    if pre_stop is not None:
        container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", pre_stop]}}}
    if s3_secret:
        container["envFrom"] = [{"secretRef": {"name": s3_secret}}]
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": grace_s,
                            "securityContext": dict(POD_SECURITY)}
    if config.shm_size:
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}]
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [dict(t) for t in pool.tolerations]
    if pool.affinity:
        spec["affinity"] = pool.affinity
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def build_rayjob(job_id: str, spec: JobSpec, tenant: str, config: KubeRayConfig,
                 package_uri: str | None = None, env: JobEnv | None = None) -> dict[str, Any]:
    """The RayJob object for one admitted job (a plain dict, ready for the API). ``package_uri``:
    where the job's code package is (an ``s3://`` URI the pods can read), if it has one. ``env``:
    the server's variables for the run (its secret part read from :func:`report_secret`)."""
    check_spec(spec)
    job_env = env if env is not None else JobEnv()
    check_job_env(job_env)
    env = dict(config.env)  # worker pods: the admin's variables only
    if package_uri is not None:
        if not is_remote_uri(package_uri):
            raise ValueError(f"package_uri: got {package_uri!r}; pods can only fetch a package from object storage")
        spec = spec.model_copy(update={"workdir": "."})
        # Ray fetches an s3:// working_dir with boto3, which knows nothing of SHIPYARD_S3_ENDPOINT.
        if env.get("SHIPYARD_S3_ENDPOINT") and not {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} & set(env):
            env["AWS_ENDPOINT_URL_S3"] = env["SHIPYARD_S3_ENDPOINT"]
    name = rayjob_name(job_id)
    w = spec.workers
    image = getattr(spec, "image", None) or config.image
    check_image(image, config)
    memory = getattr(w, "memory", None) or config.worker_memory
    gpus = math.ceil(w.gpus)
    pool = _pool(config, getattr(w, "pool", None) or (config.gpu_pool if gpus else config.cpu_pool))
    labels = {MANAGED_BY: "shipyard", JOB_ID: label_value(job_id), TENANT: label_value(tenant)}
    pod_labels = {**labels, RAYJOB: name}
    grace_s = math.ceil(spec.checkpoint.preemption_grace_s if spec.checkpoint else 0) + GRACE_MARGIN_S
    worker_resources = {"cpu": _cpu(w.cpus), "memory": memory, **({GPU: str(gpus)} if gpus else {})}
    ns = namespace_of(config, tenant)
    head_env = {k: v for k, v in env.items() if k not in job_env.secret}
    head_env.update({k: k8s_literal(v) for k, v in {
        **job_env.plain, SPEC_ENV: spec_json(spec), **driver_env(job_id, f"{ns}/{name}", spec),
        DRIVER_PIDFILE_ENV: DRIVER_PIDFILE}.items()})
    secret_env = (report_secret_name(name), tuple(job_env.secret)) if job_env.secret else None
    head = _pod(config, name="ray-head", image=image, pool=_pool(config, config.cpu_pool), labels=pod_labels,
                resources={"cpu": config.head_cpus, "memory": config.head_memory},
                env=head_env, grace_s=grace_s, s3_secret=s3_secret_of(config, tenant), secret_env=secret_env,
                pre_stop=PRESTOP)
    worker = _pod(config, name="ray-worker", image=image, pool=pool, labels=pod_labels,
                  resources=worker_resources, env=env, grace_s=grace_s, s3_secret=s3_secret_of(config, tenant))
    worker_params = {"num-cpus": str(math.ceil(w.cpus)), **({"num-gpus": str(gpus)} if gpus else {})}
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint_command(job_id),
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,  # retries belong to Ray Train (max_failures), which resumes from checkpoints
        "shutdownAfterJobFinishes": config.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
        # The operator's own backstop for a cluster that never comes up (e.g. the server is down);
        # the server reports the reason earlier, at init_timeout_s.
        "preRunningDeadlineSeconds": config.init_timeout_s + 300,
        "rayClusterSpec": {
            "rayVersion": config.ray_version,
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"}, "template": head},
            "workerGroupSpecs": [{
                # KubeRay: replicas is the starting size; with the autoscaler on, the autoscaler
                # owns it within [minReplicas, maxReplicas]. An elastic job starts at min.
                "groupName": "workers", "replicas": w.fewest, "minReplicas": w.fewest, "maxReplicas": w.count,
                "rayStartParams": worker_params, "template": worker,
            }],
        },
    }
    if w.elastic:
        job_spec["rayClusterSpec"]["enableInTreeAutoscaling"] = True
    if config.queue:
        labels[KUEUE_QUEUE] = config.queue
        job_spec["suspend"] = True  # Kueue unsuspends it once the whole gang is admitted
    if config.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = config.active_deadline_seconds
    if package_uri is not None:
        job_spec["runtimeEnvYAML"] = yaml.safe_dump({"working_dir": package_uri}, sort_keys=True)
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {JOB_ID: job_id, TENANT: tenant}},
        "spec": job_spec,
    }


def report_secret(rayjob: dict[str, Any], env: JobEnv) -> dict[str, Any]:
    """The Secret that holds ``env.secret`` for the head container of ``rayjob`` (as
    :func:`build_rayjob` made it): one key per variable, in the RayJob's namespace, with its
    labels (Kueue's aside: it admits workloads, not Secrets) and annotations. Its owner
    reference is added once the RayJob exists (:func:`owner_reference`)."""
    check_job_env(env)
    meta = rayjob["metadata"]
    labels = {k: v for k, v in meta["labels"].items() if k != KUEUE_QUEUE}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": report_secret_name(meta["name"]), "namespace": meta["namespace"],
                         "labels": labels, "annotations": dict(meta.get("annotations") or {})},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in env.secret.items()}}


def owner_reference(rayjob: dict[str, Any]) -> dict[str, Any]:
    """What makes a dependent (the report Secret) go with the RayJob: Kubernetes' garbage
    collector deletes it once the RayJob is gone. Needs the uid the API server gave the RayJob.
    No ``blockOwnerDeletion``: it would need update on rayjobs/finalizers, and nothing waits on
    the Secret."""
    meta = rayjob["metadata"]
    if not meta.get("uid"):
        raise ValueError(f"RayJob {meta.get('name')}: no metadata.uid (not an object the API server returned)")
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": meta["name"], "uid": meta["uid"]}


def quantity(value: Any) -> Decimal:
    from kubernetes.utils import parse_quantity

    return parse_quantity(value) if value not in (None, "") else Decimal(0)


def container_requests(containers: list[dict]) -> Resources:
    total = Resources()
    for c in containers:
        req = {**(c.get("resources") or {}).get("limits", {}), **(c.get("resources") or {}).get("requests", {})}
        total += Resources(float(quantity(req.get("cpu"))), float(quantity(req.get(GPU))), int(quantity(req.get("memory"))))
    return total


def rayjob_requests(obj: dict[str, Any]) -> Resources:
    """What a RayJob's cluster asks of the nodes: the head pod plus every worker pod."""
    rcs = (obj.get("spec") or {}).get("rayClusterSpec") or {}
    total = container_requests(rcs.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers", []))
    for group in rcs.get("workerGroupSpecs") or []:
        pods = (group.get("replicas") or 0) * (group.get("numOfHosts") or 1)
        one = container_requests(group.get("template", {}).get("spec", {}).get("containers", []))
        total += Resources(one.cpus * pods, one.gpus * pods, one.memory * pods)
    return total


def node_allocatable(node: dict[str, Any]) -> Resources:
    """A node's allocatable resources; zero for cordoned or not-Ready nodes."""
    if (node.get("spec") or {}).get("unschedulable"):
        return Resources()
    status = node.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if ready and ready[0].get("status") != "True":
        return Resources()
    alloc = status.get("allocatable") or {}
    return Resources(float(quantity(alloc.get("cpu"))), float(quantity(alloc.get(GPU))), int(quantity(alloc.get("memory"))))
