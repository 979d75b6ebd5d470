"""The kuberay backend against a real Kubernetes API server: the upstream
apiextensions-apiserver (Kubernetes 1.36 code) on etcd with KubeRay's CRDs, started by
deploy/k8s-api.sh (the session fixture ``k8s_api`` in tests/conftest.py).

What it checks that kmock cannot: every RayJob shipyard builds passes the real openAPI and CEL
validation with ``fieldValidation=Strict`` (a field the CRD would prune fails the create) and
reads back as sent; its status, patched on ``/status`` as the KubeRay operator does, reads as the
right shipyard state; real label selectors, merge-patch suspend, deletion held by the operator's
finalizer, RBAC's 403 and an API that is not served. No operator runs: the tests play it. The
server serves no core API, so pods, events and nodes stay in test_kuberay_backend.py (kmock).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shipyard.backends.base import BackendError, JobEnv, State
from shipyard.backends.kuberay import KubeRayBackend
from shipyard.backends.kuberay_manifest import (
    GROUP, JOB_ID, MANAGED_BY, MAX_NAME, PLURAL, TENANT, VERSION, KubeRayConfig, NodePool, build_rayjob, rayjob_name,
    report_secret_name,
)
from shipyard.packages import PackageStore
from shipyard.spec import spec_from_dict

FINALIZER = "ray.io/rayjob-finalizer"  # what the operator puts on every RayJob it manages
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
A100_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}]}]}}}
CONFIG = KubeRayConfig(
    image="registry.example.com/shipyard/worker:0.1.0", s3_secret="shipyard-s3",
    env={"SHIPYARD_S3_ENDPOINT": "http://minio.storage:9000"}, active_deadline_seconds=86400,
    pools={"a100": NodePool({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, [GPU_TOLERATION], A100_AFFINITY),
           "h100": NodePool({"pool": "h100"}, [GPU_TOLERATION]),
           "cpu": NodePool({"pool": "cpu"})},
    gpu_pool="a100", cpu_pool="cpu")
PACKAGE = "sha256:" + "ab" * 32
PACKAGE_URI = "s3://packages/shipyard/team-a/" + "ab" * 32 + ".zip"


def make_spec(**changes) -> dict:
    raw = {"name": "digits", "entrypoint": "train.py:train", "workdir": "/opt/shipyard/jobs/digits",
           "workers": {"count": 4, "cpus": 2}, "strategy": {"kind": "ddp"},
           "dataset": {"uri": "s3://data/digits"}, "checkpoint": {"uri": "s3://ckpt/digits", "every_steps": 10}}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


# Every kind of RayJob shipyard builds: (spec changes, config changes, with a code package).
CASES = {
    **{f"{kind}-{dev}": ({"strategy": strategy, "workers": {"gpus": gpus}}, {}, False)
       for kind, strategy in [("ddp", {"kind": "ddp"}), ("horovod", {"kind": "horovod"}),
                              ("fsdp", {"kind": "fsdp", "mixed_precision": "none", "activation_checkpoint": True}),
                              ("tensor", {"kind": "tensor", "tp": 2}),
                              ("pipeline", {"kind": "pipeline", "stages": 2, "microbatches": 4, "schedule": "gpipe"}),
                              ("hybrid", {"kind": "hybrid", "tp": 2, "dp_shard": 2})]
       for dev, gpus in [("cpu", 0), ("gpu", 1)]},
    "fractional-gpus": ({"workers": {"gpus": 0.5, "cpus": 1.5}}, {}, False),
    "named-pool-memory-image": ({"workers": {"gpus": 8, "pool": "h100", "memory": "512Gi"},
                                 "image": "registry.example.com/team/custom:1"}, {}, False),
    "elastic": ({"workers": {"count": None, "min": 2, "max": 8, "gpus": 1, "resize_interval_s": 120}}, {}, False),
    "preemption": ({"priority": 500, "max_failures": -1, "checkpoint": {"preemption_grace_s": 120, "every_seconds": 60}},
                   {}, False),
    "code-package": ({"package": PACKAGE}, {}, True),
    "single-worker": ({"workers": {"count": 1, "cpus": 0.25}}, {}, False),
    "minimal-config": ({}, {"s3_secret": None, "env": {}, "shm_size": None, "pools": {}, "gpu_pool": None,
                            "cpu_pool": None, "active_deadline_seconds": None, "shutdown_after_job_finishes": False},
                       False),
    "full-config": ({"workers": {"gpus": 2}}, {"service_account": "ray-jobs", "image_pull_secrets": ("regcred", "mirror"),
                                               "image_pull_policy": "Always", "cancel": "suspend",
                                               "ttl_seconds_after_finished": 0, "init_timeout_s": 60}, False),
}


def spec_of(changes: dict):
    raw = make_spec(**changes)
    raw["workers"] = {k: v for k, v in raw["workers"].items() if v is not None}
    return spec_from_dict(raw)


class Operator:
    """What the KubeRay operator does to a RayJob that matters to shipyard, done by hand through
    the same API: its finalizer, and the status it writes on ``/status``."""

    def __init__(self, api: client.ApiClient, ns: str):
        self.custom, self.ns = client.CustomObjectsApi(api), ns

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def finalize(self, name: str, on: bool = True) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name,
                                                   {"metadata": {"finalizers": [FINALIZER] if on else None}})

    def status(self, name: str, deployment: str, job: str | None = None, **extra) -> dict:
        """Patch ``status`` as the operator's reconciler does: jobDeploymentStatus always,
        jobStatus once the job was submitted, the cluster's name and times alongside."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {"jobDeploymentStatus": deployment, "rayClusterName": f"{name}-x7k2p", "startTime": now,
                  "observedGeneration": 1, **extra}
        if job is not None:
            status.update(jobStatus=job, jobId=f"{name}-abc12",
                          dashboardURL=f"{name}-x7k2p-head-svc.{self.ns}.svc.cluster.local:8265")
        if deployment in ("Complete", "Failed"):
            status["endTime"] = now
        # Strict here too: a status field the CRD does not have would fail the test's own patch.
        return self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, name,
                                                                 {"status": status}, field_validation="Strict")


@pytest.fixture
def ns() -> str:
    """A namespace of the test's own (this server does not check that namespaces exist)."""
    return f"t-{uuid.uuid4().hex[:10]}"


def backend(k8s_api, ns: str, limited: bool = False, clock=time.time, packages=None, **changes) -> KubeRayBackend:
    config = KubeRayConfig(**{**CONFIG.__dict__, "namespace": ns, **changes})
    return KubeRayBackend(config, api_client=k8s_api.api_client(limited), clock=clock, packages=packages)


def missing(sent, stored, path: str = "") -> list[str]:
    """Paths where ``stored`` lacks or changed something of ``sent`` (what it adds, the server's
    defaults and metadata, is allowed)."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        return [p for k, v in sent.items()
                for p in ([f"{path}.{k}"] if k not in stored else missing(v, stored[k], f"{path}.{k}"))]
    if isinstance(sent, list) and isinstance(stored, list) and len(sent) == len(stored):
        return [p for i, (a, b) in enumerate(zip(sent, stored)) for p in missing(a, b, f"{path}[{i}]")]
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]


# -- every RayJob shipyard builds --------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_every_rayjob_is_accepted_strictly_and_stored_as_sent(k8s_api, ns, case):
    spec_changes, config_changes, packaged = CASES[case]
    spec = spec_of(spec_changes)
    be = backend(k8s_api, ns, packages=PackageStore("s3://packages/shipyard") if packaged else None, **config_changes)
    job_id = f"job-{case}"
    package_uri = PACKAGE_URI if packaged else None
    handle = be.submit(job_id, spec, "team-a")  # fieldValidation=Strict: an unknown field is a 400
    sent = build_rayjob(job_id, spec, "team-a", be.config, package_uri=package_uri)
    stored = Operator(k8s_api.api_client(), ns).get(rayjob_name(job_id))
    assert missing(sent, stored) == []
    group, = stored["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["numOfHosts"] == 1  # the CRD's default, applied by the server
    rcs = stored["spec"]["rayClusterSpec"]
    periods = {rcs["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"],
               group["template"]["spec"]["terminationGracePeriodSeconds"]}
    assert len(periods) == 1 and periods.pop() > spec.checkpoint.preemption_grace_s  # no kill mid-commit
    if spec.workers.elastic:  # starts at min, Ray's autoscaler grows it to max
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"], rcs["enableInTreeAutoscaling"]) \
            == (2, 2, 8, True)
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]
    assert (be.status(handle).state, be.list_jobs()) == (State.PENDING, {job_id: handle})


def test_a_long_job_id_makes_a_valid_name(k8s_api, ns):
    be = backend(k8s_api, ns)
    job_id = "Job_" + "x" * 120
    handle = be.submit(job_id, spec_of({}), "team-a")
    assert len(handle.split("/")[1]) <= MAX_NAME
    assert be.list_jobs() == {job_id: handle}  # the exact id, from the annotation


def test_strict_validation_is_not_vacuous(k8s_api, ns):
    """The real server rejects what the CRD lacks under Strict and drops it silently without it
    (why the backend sends Strict), and enforces the CRD's CEL rules (jsonschema does not)."""
    custom = client.CustomObjectsApi(k8s_api.api_client())
    body = build_rayjob("job-x", spec_of({}), "team-a", backend(k8s_api, ns).config)
    body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicaz"] = 3
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    assert err.value.status == 400
    assert 'unknown field "spec.rayClusterSpec.workerGroupSpecs[0].replicaz"' in json.loads(err.value.body)["message"]
    stored = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)  # the server's default: Warn
    assert "replicaz" not in stored["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # pruned, no error

    del body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicaz"]
    body["metadata"]["name"] = "cel-check"
    body["spec"]["managedBy"] = "someone-else"
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    assert err.value.status == 422 and "managedBy field value must be either" in json.loads(err.value.body)["message"]


# -- status through KubeRay's states -----------------------------------------------------------

# (jobDeploymentStatus, jobStatus, extra status fields) -> shipyard state, as the operator moves them
# (no Retrying: shipyard sets backoffLimit 0, retries belong to Ray Train, so the operator never retries)
FLOWS = {
    "success": [("", None, {}, State.PENDING), ("New", None, {}, State.PENDING),
                ("Initializing", None, {}, State.PENDING), ("Running", "PENDING", {}, State.PENDING),
                ("Running", "RUNNING", {}, State.RUNNING), ("Complete", "SUCCEEDED", {"succeeded": 1}, State.SUCCEEDED)],
    "app-failure": [("Initializing", None, {}, State.PENDING), ("Running", "RUNNING", {}, State.RUNNING),
                    ("Failed", "FAILED", {"failed": 1, "reason": "AppFailed",
                                          "message": "Job entrypoint command failed with exit code 1"}, State.FAILED)],
    "validation-failed": [("ValidationFailed", None, {"reason": "ValidationFailed",
                                                      "message": "invalid RayJob spec"}, State.FAILED)],
    "submission-failed": [("Initializing", None, {}, State.PENDING),
                          ("Failed", None, {"reason": "SubmissionFailed", "message": "the submitter failed"}, State.FAILED)],
    "stopped-by-someone": [("Running", "RUNNING", {}, State.RUNNING), ("Running", "STOPPED", {}, State.STOPPED)],
    "waiting-for-kueue": [("Waiting", None, {}, State.PENDING), ("Initializing", None, {}, State.PENDING)],
}


@pytest.mark.parametrize("flow", list(FLOWS))
def test_status_follows_the_operator(k8s_api, ns, flow):
    be, op = backend(k8s_api, ns), Operator(k8s_api.api_client(), ns)
    handle = be.submit(f"job-{flow}", spec_of({"workers": {"gpus": 1}}), "team-a")
    name = handle.split("/")[1]
    seen = []
    for deployment, job, extra, _ in FLOWS[flow]:
        stored = op.status(name, deployment, job, **extra)
        assert stored["status"]["jobDeploymentStatus"] == deployment  # kept: the status schema has it
        status = be.status(handle)
        seen.append(status.state)
        if "reason" in extra:
            assert (status.reason, status.message) == (extra["reason"], extra["message"])
    assert seen == [expected for *_, expected in FLOWS[flow]]
    assert op.get(name)["spec"]["entrypoint"] == build_rayjob(
        f"job-{flow}", spec_of({"workers": {"gpus": 1}}), "team-a", be.config)["spec"]["entrypoint"]  # /status left spec alone


def test_cancel_deletes_through_the_operators_finalizer(k8s_api, ns):
    be, op = backend(k8s_api, ns), Operator(k8s_api.api_client(), ns)
    handle = be.submit("job-del", spec_of({}), "team-a")
    name = handle.split("/")[1]
    op.finalize(name)
    op.status(name, "Running", "RUNNING")
    be.cancel(handle)
    held = op.get(name)  # the finalizer holds it until the operator has torn the cluster down
    assert held["metadata"]["deletionTimestamp"]
    restarted = backend(k8s_api, ns)  # a server without this instance's memory
    st = restarted.status(handle)
    assert (st.state, st.reason) == (State.STOPPED, "Deleted")
    op.finalize(name, on=False)
    with pytest.raises(ApiException) as err:
        op.get(name)
    assert err.value.status == 404
    assert (be.status(handle).state, be.status(handle).reason) == (State.STOPPED, "Cancelled")
    st = restarted.status(handle)
    assert (st.state, st.reason) == (State.FAILED, "NotFound") and "ttlSecondsAfterFinished" in st.message
    be.cancel(handle)  # again: a no-op
    assert restarted.list_jobs() == {}


def test_cancel_by_suspend_is_a_merge_patch_the_server_accepts(k8s_api, ns):
    be, op = backend(k8s_api, ns, cancel="suspend"), Operator(k8s_api.api_client(), ns)
    handle = be.submit("job-sus", spec_of({}), "team-a")
    name = handle.split("/")[1]
    op.status(name, "Running", "RUNNING")
    be.cancel(handle)
    stored = op.get(name)
    assert stored["spec"]["suspend"] is True and stored["metadata"]["generation"] == 2
    op.status(name, "Suspending")
    op.status(name, "Suspended")
    assert backend(k8s_api, ns).status(handle).state is State.STOPPED
    be.cancel(backend(k8s_api, ns).list_jobs()["job-sus"])  # suspending a suspended job: fine


def test_a_kueue_job_waits_suspended_and_runs_when_kueue_admits_it(k8s_api, ns):
    """With ``queue``, the RayJob is created suspended with Kueue's label (Strict, so the server
    keeps both), is PENDING with Kueue named while suspended (never timed out as a stuck start),
    RUNNING once Kueue unsuspends it, and a cancel deletes it (a suspend would requeue it in Kueue)."""
    late = backend(k8s_api, ns, queue="team-a-gpus", clock=lambda: time.time() + 10_000, init_timeout_s=600)
    op = Operator(k8s_api.api_client(), ns)
    handle = late.submit("job-kueue", spec_of({"workers": {"gpus": 1}}), "team-a")
    name = handle.split("/")[1]
    stored = op.get(name)
    assert stored["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert stored["spec"]["suspend"] is True
    for deployment in (None, "Suspended"):  # before the operator looked, and after
        if deployment:
            op.status(name, deployment)
        st = late.status(handle)
        assert (st.state, st.reason) == (State.PENDING, "KueueAdmission")
        assert "waiting for Kueue admission in queue team-a-gpus" in st.message and ns in st.message
    op.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": False}})
    op.status(name, "Running", "RUNNING")  # Kueue admitted it, the operator started the cluster
    assert late.status(handle).state is State.RUNNING
    late.cancel(handle)
    with pytest.raises(ApiException) as err:
        op.get(name)
    assert err.value.status == 404


def test_a_tenant_with_its_own_namespace_runs_there_and_is_still_listed(k8s_api, ns):
    own = f"{ns}-b"
    be = backend(k8s_api, ns, namespaces={"team-b": own})
    a, b = be.submit("job-a", spec_of({}), "team-a"), be.submit("job-b", spec_of({}), "team-b")
    assert (a, b) == (f"{ns}/{rayjob_name('job-a')}", f"{own}/{rayjob_name('job-b')}")
    assert Operator(k8s_api.api_client(), own).get(rayjob_name("job-b"))["metadata"]["annotations"][TENANT] == "team-b"
    assert backend(k8s_api, ns, namespaces={"team-b": own}).list_jobs() == {"job-a": a, "job-b": b}  # a restart finds both
    assert be.status(b).state is State.PENDING


def test_stuck_initializing_times_out_and_releases_the_cluster(k8s_api, ns):
    """Past init_timeout_s the job fails and its RayJob is deleted. The pods' diagnosis is best
    effort: this server has no pods API, so the reason stays the timeout's."""
    be = backend(k8s_api, ns, clock=lambda: time.time() + 601, init_timeout_s=600)
    op = Operator(k8s_api.api_client(), ns)
    handle = be.submit("job-stuck", spec_of({"workers": {"gpus": 1}}), "team-a")
    name = handle.split("/")[1]
    op.status(name, "Initializing")
    assert backend(k8s_api, ns, init_timeout_s=600).status(handle).state is State.PENDING  # now: within the timeout
    st = be.status(handle)
    assert (st.state, st.reason) == (State.FAILED, "InitializingTimeout")
    assert "did not start within 600s" in st.message
    with pytest.raises(ApiException):
        op.get(name)
    assert be.status(handle).reason == "InitializingTimeout"  # remembered after the delete


def test_label_selector_keeps_foreign_rayjobs_out(k8s_api, ns):
    be = backend(k8s_api, ns)
    custom = client.CustomObjectsApi(k8s_api.api_client())
    ours = {j: be.submit(j, spec_of({}), "team-a") for j in ("job-a", "Job_B")}
    for name, labels in [("foreign", {}), ("half-ours", {MANAGED_BY: "shipyard"}),
                         ("other-tool", {MANAGED_BY: "kueue", JOB_ID: "job-z"})]:
        body = build_rayjob(name, spec_of({}), "t", be.config)
        body["metadata"].update(name=name, labels=labels)
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                  label_selector=f"{MANAGED_BY}=shipyard,{JOB_ID}")
    assert sorted(o["metadata"]["name"] for o in listed["items"]) == sorted(h.split("/")[1] for h in ours.values())
    assert backend(k8s_api, ns).list_jobs() == ours


def test_a_rejected_create_names_the_field(k8s_api, ns):
    """A RayJob the CRD refuses fails the submit with the server's reason, naming the field."""
    be = backend(k8s_api, ns, head_memory="lots")
    with pytest.raises(BackendError, match=r"cannot create RayJob .*: HTTP 422: .*"
                                           r"spec\.rayClusterSpec\.headGroupSpec\.template\.spec\.containers\[0\]"
                                           r"\.resources\.(limits|requests)\.memory"):
        be.submit("job-bad", spec_of({}), "team-a")


# -- what is missing: RBAC and unserved APIs (issue 21 item 3) ----------------------------------

def test_capacity_without_the_node_api_names_it_and_the_rbac_rule(k8s_api, ns):
    with pytest.raises(BackendError) as err:
        backend(k8s_api, ns).capacity()
    msg = str(err.value)
    assert msg.startswith("cannot list nodes for the cluster's capacity: HTTP 404: the core v1 Node API is not served here")
    assert 'apiGroups: [""], resources: ["nodes"], verbs: ["list"]' in msg
    assert "RayJob" not in msg  # the RayJob API is served: it is not what is missing


def test_forbidden_names_the_rbac_rule(k8s_api, ns):
    limited = backend(k8s_api, ns, limited=True)
    with pytest.raises(BackendError) as err:
        limited.capacity()
    msg = str(err.value)
    assert msg.startswith("cannot list nodes for the cluster's capacity: HTTP 403: forbidden:")
    assert 'apiGroups: [""], resources: ["nodes"], verbs: ["list"]} in a ClusterRole' in msg
    assert "clusterRole.create" in msg and "not served" not in msg
    with pytest.raises(BackendError) as err:
        limited.submit("job-f", spec_of({}), "team-a")
    msg = str(err.value)
    assert f'apiGroups: ["ray.io"], resources: ["rayjobs"], verbs: ["create"]}} in a Role in namespace {ns}' in msg
    assert "shipyard-limited" in msg  # the server's own words name the user


def test_only_a_missing_rayjob_api_says_so(k8s_api_bare, k8s_api, ns):
    bare = backend(k8s_api_bare, ns)
    for call in (lambda: bare.submit("job-n", spec_of({}), "team-a"), bare.list_jobs):
        with pytest.raises(BackendError, match=r"HTTP 404: the ray.io/v1 RayJob API is not served here .*"
                                               r"install the KubeRay operator and its CRDs"):
            call()
    with pytest.raises(BackendError) as err:
        bare.capacity()
    assert "Node API is not served" in str(err.value) and "RayJob" not in str(err.value)
    # With the CRDs installed, the same calls work: the message never comes from elsewhere.
    be = backend(k8s_api, ns)
    be.submit("job-n", spec_of({}), "team-a")
    assert list(be.list_jobs()) == ["job-n"]


def test_without_the_network_policy_api_jobs_run_with_one_warning(k8s_api, ns, caplog):
    """This server serves no networking.k8s.io API, as a dev cluster without a CNI may not: its
    real 404s (on the create, then on discovery) make the backend warn once and run jobs without
    a NetworkPolicy, instead of failing every submit. (The policy itself is checked against the
    Kubernetes schema in tests/unit/test_kuberay_isolation.py.)"""
    be = backend(k8s_api, ns)
    with caplog.at_level(logging.WARNING, logger="shipyard.backends.kuberay"):
        handles = [be.submit(j, spec_of({}), "team-a") for j in ("job-np1", "job-np2")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "networking.k8s.io/v1 NetworkPolicy API is not served" in warnings[0]
    op = Operator(k8s_api.api_client(), ns)
    for handle in handles:
        assert op.get(handle.split("/")[1])["metadata"]["uid"]  # created, and kept


# -- the server's variables on the head (issue 21 item 2) ---------------------------------------

def test_a_rayjob_with_the_servers_env_is_accepted_strictly(k8s_api, ns):
    """The head container with the report URL and roots as values, the token and the tenant's
    variables as secretKeyRefs and its preStop hook: the real server takes it under Strict and
    stores it as sent. This server serves no Secrets (kmock covers them:
    test_kuberay_reports.py), so the backend's submit stops at the Secret, naming what is missing,
    and starts nothing."""
    env = JobEnv(plain={"SHIPYARD_REPORT_URL": "http://shipyard.shipyard:8321/v1/jobs/job-env/report",
                        "SHIPYARD_STORAGE_ROOTS": '[{"uri": "s3://team-a/", "writable": true}]'},
                 secret={"SHIPYARD_REPORT_TOKEN": "shr_x.y", "AWS_SECRET_ACCESS_KEY": "k"})
    be = backend(k8s_api, ns)
    body = build_rayjob("job-env", spec_of({}), "team-a", be.config, env=env)
    client.CustomObjectsApi(k8s_api.api_client()).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    name = rayjob_name("job-env")
    stored = Operator(k8s_api.api_client(), ns).get(name)
    assert missing(body, stored) == []
    head, = stored["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"] if "valueFrom" in e}
    assert refs == {k: {"name": report_secret_name(name), "key": k} for k in env.secret}
    assert head["lifecycle"]["preStop"]["exec"]["command"][:2] == ["/bin/sh", "-c"]
    assert "shr_x.y" not in json.dumps(stored)
    assert be.list_jobs() == {"job-env": f"{ns}/{name}"}

    with pytest.raises(BackendError) as err:
        be.submit("job-s", spec_of({}), "team-a", env=lambda submission: env)
    assert str(err.value).startswith(f"cannot create Secret {ns}/{report_secret_name(rayjob_name('job-s'))}: "
                                     "HTTP 404: the core v1 Secret API is not served here"), str(err.value)
    assert "needs a full Kubernetes API server" in str(err.value)
    assert list(be.list_jobs()) == ["job-env"]  # no RayJob without its Secret
