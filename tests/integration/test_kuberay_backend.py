"""The kuberay backend against a fake Kubernetes API over HTTP (kmock), with a small simulated
KubeRay controller: the tests move a RayJob's status the way the operator does.

No real kube-apiserver runs here. kmock stores objects and answers the official client's
requests; it does not apply label or field selectors (the backend checks labels itself, and the
tests check that the selectors are sent). The backend is synchronous (as the official client is),
so it runs in a thread while kmock's server runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid

import pytest
from kubernetes import client

from shipyard.backends.base import BackendError, State
from shipyard.backends.kuberay import KubeRayBackend
from shipyard.backends.kuberay_isolation import network_policy
from shipyard.backends.kuberay_manifest import KubeRayConfig, NodePool, build_rayjob, rayjob_name
from shipyard.errors import SpecError
from shipyard.packages import PackageStore
from shipyard.spec import spec_from_dict

pytest.importorskip("kmock", reason="kmock (a fake Kubernetes API for pods, events, nodes and Secrets) is a dev dependency: pip install -e '.[dev]'")
pytestmark = pytest.mark.asyncio

NS = "training"
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CONFIG = KubeRayConfig(image="registry.example.com/shipyard/worker:0.1.0", namespace=NS, s3_secret="shipyard-s3",
                       pools={"a100": NodePool({"pool": "a100"}, [{"key": "nvidia.com/gpu", "operator": "Exists"}])},
                       gpu_pool="a100", init_timeout_s=600)


def spec(count: int = 2, gpus: float = 1.0):
    return spec_from_dict({"name": "digits", "entrypoint": "train:train", "workdir": "/opt/jobs/digits",
                           "workers": {"count": count, "cpus": 2, "gpus": gpus},
                           "dataset": {"uri": "s3://data/digits"}, "checkpoint": {"uri": "s3://ckpt/digits"}})


RAYJOBS, POLICIES = "ray.io/v1/rayjobs", "networking.k8s.io/v1/networkpolicies"


@pytest.fixture
def k8s(kmock):
    for res, kind, namespaced in [(RAYJOBS, "RayJob", True), ("v1/pods", "Pod", True), ("v1/events", "Event", True),
                                  ("v1/nodes", "Node", False), (POLICIES, "NetworkPolicy", True)]:
        kmock.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=namespaced)

    def created(req):
        """As the API server does: the stored object gets a uid, and the answer is the stored object."""
        obj = kmock.objects[kmock.resource(RAYJOBS), req.data["metadata"]["namespace"], req.data["metadata"]["name"]]
        if not obj.get("metadata", {}).get("uid"):
            obj.patch({"metadata": {"uid": str(uuid.uuid4())}})
        return obj.raw

    # The official client only reads the body of a create answered with 201, as the API server does.
    kmock["post", kmock.resource(RAYJOBS)] << 201 << created
    kmock["post", kmock.resource(POLICIES)] << 201 << (lambda req: req.data)
    return kmock


def backend(k8s, clock=lambda: T0.timestamp(), packages=None, **changes) -> KubeRayBackend:
    api = client.ApiClient(client.Configuration(host=str(k8s.url).rstrip("/")))
    config = KubeRayConfig(**{**CONFIG.__dict__, **changes})
    return KubeRayBackend(config, api_client=api, clock=clock, packages=packages)


def call(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


class FakeKubeRay:
    """What the operator would do to a RayJob, pod and event objects, done by hand."""

    def __init__(self, k8s):
        self.k8s = k8s

    def key(self, plural: str, name: str, ns: str | None = NS):
        return self.k8s.resource(f"ray.io/v1/{plural}" if plural == "rayjobs" else f"v1/{plural}"), ns, name

    def rayjob(self, name: str):
        return self.k8s.objects[self.key("rayjobs", name)]

    def advance(self, name: str, deployment: str, job: str = "", **extra) -> None:
        status = {"jobDeploymentStatus": deployment, "rayClusterName": f"{name}-abcde", **extra}
        if job:
            status["jobStatus"] = job
        self.rayjob(name).patch({"metadata": {"creationTimestamp": T0.isoformat().replace("+00:00", "Z")},
                                 "status": status})

    def pod(self, name: str, labels: dict, status: dict) -> None:
        self.k8s.objects[self.key("pods", name)] = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"containers": [{"name": "ray", "image": "x"}]}, "status": status}

    def event(self, name: str, involved: tuple[str, str], reason: str, message: str) -> None:
        self.k8s.objects[self.key("events", name)] = {
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": NS}, "type": "Warning",
            "involvedObject": {"kind": involved[0], "name": involved[1], "namespace": NS},
            "reason": reason, "message": message, "lastTimestamp": T0.isoformat()}

    def node(self, name: str, cpu: str, memory: str, gpus: str | None = None, ready: bool = True,
             cordoned: bool = False) -> None:
        alloc = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
        self.k8s.objects[self.key("nodes", name, None)] = {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"unschedulable": cordoned},
            "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": str(ready)}]}}


async def test_submit_creates_the_rayjob_and_follows_it_to_success(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-1", spec(), "team-a")
    name = rayjob_name("job-1")
    assert handle == f"{NS}/{name}"
    create, = k8s["post", k8s.resource("ray.io/v1/rayjobs")]
    assert create.url.path == f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
    assert create.data == build_rayjob("job-1", spec(), "team-a", CONFIG)
    assert create.params["fieldValidation"] == "Strict"  # what the real server does with it: test_kuberay_real_api

    assert (await call(be.status, handle)).state is State.PENDING  # no status yet: the operator has not seen it
    op.advance(name, "Initializing")
    assert (await call(be.status, handle)).state is State.PENDING
    op.advance(name, "Running", "PENDING")
    assert (await call(be.status, handle)).state is State.PENDING
    op.advance(name, "Running", "RUNNING")
    assert (await call(be.status, handle)).state is State.RUNNING
    op.advance(name, "Complete", "SUCCEEDED")
    assert (await call(be.status, handle)).state is State.SUCCEEDED

    # Submitting again (the server died before storing the handle) finds the same RayJob.
    assert await call(be.submit, "job-1", spec(), "team-a") == handle


PACKAGE = "sha256:" + "cd" * 32


async def test_a_code_package_runs_from_object_storage_and_a_local_store_is_refused(k8s, tmp_path):
    packaged = spec().model_copy(update={"package": PACKAGE})
    local = backend(k8s, packages=PackageStore(tmp_path / "packages"))
    with pytest.raises(SpecError, match=r"package: .*local directory.*--package-store s3://"):
        local.check_package(packaged)  # what the API asks before queueing the job
    with pytest.raises(BackendError, match=r"job-p1: package: .*--package-store s3://"):
        await call(local.submit, "job-p1", packaged, "team-a")
    assert not k8s["post", k8s.resource("ray.io/v1/rayjobs")]
    local.check_package(spec())  # a job without a package (its code in the image) is fine

    remote = backend(k8s, packages=PackageStore("s3://packages/shipyard"))
    remote.check_package(packaged)
    await call(remote.submit, "job-p2", packaged, "team-a")
    create, = k8s["post", k8s.resource("ray.io/v1/rayjobs")]
    uri = "s3://packages/shipyard/team-a/" + "cd" * 32 + ".zip"
    assert create.data == build_rayjob("job-p2", packaged, "team-a", CONFIG, package_uri=uri)
    assert uri in create.data["spec"]["runtimeEnvYAML"]


async def test_a_failed_job_surfaces_the_operator_reason(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-2", spec(), "team-a")
    op.advance(rayjob_name("job-2"), "Failed", "FAILED", reason="AppFailed",
               message="Job entrypoint command failed with exit code 1")
    st = await call(be.status, handle)
    assert (st.state, st.reason, st.message) == (State.FAILED, "AppFailed", "Job entrypoint command failed with exit code 1")


async def test_stuck_initializing_times_out_with_the_pod_reason_and_releases_the_cluster(k8s):
    now = [T0.timestamp() + 60]
    be, op = backend(k8s, clock=lambda: now[0]), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-3", spec(), "team-a")
    name = rayjob_name("job-3")
    op.advance(name, "Initializing")
    labels = {"shipyard.io/rayjob": name}
    op.pod("a-pod-of-someone-else", {}, {"phase": "Pending", "containerStatuses": [{"name": "c", "ready": False,
           "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {"reason": "ErrImagePull"}}}]})
    op.pod(f"{name}-head", labels, {"phase": "Pending", "containerStatuses": [{"name": "ray-head", "ready": False,
           "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff",
           "message": 'Back-off pulling image "registry.example.com/shipyard/worker:0.1.0"'}}}]})
    op.pod(f"{name}-worker-0", labels, {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
           "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})

    st = await call(be.status, handle)
    assert st.state is State.PENDING  # within init_timeout_s: still waiting

    now[0] = T0.timestamp() + 601
    st = await call(be.status, handle)
    assert (st.state, st.reason) == (State.FAILED, "ImagePullBackOff")
    assert "did not start within 600s" in st.message and f"pod {name}-head" in st.message
    assert "registry.example.com/shipyard/worker:0.1.0" in st.message
    pods_list, = k8s["get", k8s.resource("v1/pods")]
    assert pods_list.params["labelSelector"] == f"shipyard.io/rayjob={name}"
    assert len(k8s["delete", k8s.resource("ray.io/v1/rayjobs")]) == 1  # the half-started cluster is released
    assert (await call(be.status, handle)).reason == "ImagePullBackOff"  # remembered after the delete


async def test_stuck_initializing_unschedulable_from_events_only(k8s):
    be, op = backend(k8s, clock=lambda: T0.timestamp() + 3600), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-4", spec(), "team-a")
    name = rayjob_name("job-4")
    op.advance(name, "Initializing")
    op.event("e1", ("RayCluster", f"{name}-abcde"), "FailedToCreateWorkerPod",
             'pods "w" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1')
    op.event("e2", ("Pod", "unrelated"), "FailedScheduling", "not ours")
    st = await call(be.status, handle)
    assert (st.state, st.reason) == (State.FAILED, "FailedToCreateWorkerPod")
    assert "exceeded quota" in st.message and "not ours" not in st.message


async def test_cancel_deletes_or_suspends(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-5", spec(), "team-a")
    op.advance(rayjob_name("job-5"), "Running", "RUNNING")
    await call(be.cancel, handle)
    assert len(k8s["delete", k8s.resource("ray.io/v1/rayjobs")]) == 1
    assert (await call(be.status, handle)).state is State.STOPPED
    await call(be.cancel, handle)  # again: a no-op

    be = backend(k8s, cancel="suspend")
    handle = await call(be.submit, "job-6", spec(), "team-a")
    await call(be.cancel, handle)
    assert op.rayjob(rayjob_name("job-6"))["spec"]["suspend"] is True
    op.advance(rayjob_name("job-6"), "Suspended")
    fresh = backend(k8s)  # a restarted server, without this instance's memory
    assert (await call(fresh.status, handle)).state is State.STOPPED


async def test_capacity_is_ready_nodes_minus_unfinished_shipyard_jobs(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    op.node("gpu-1", "32", "128Gi", gpus="4")
    op.node("gpu-2", "32", "128Gi", gpus="4", cordoned=True)
    op.node("gpu-3", "32", "128Gi", gpus="4", ready=False)
    op.node("cpu-1", "15500m", "64Gi")
    running = await call(be.submit, "job-7", spec(count=2, gpus=1), "team-a")
    op.advance(rayjob_name("job-7"), "Running", "RUNNING")
    await call(be.submit, "job-8", spec(count=1, gpus=1), "team-a")  # pending: its pods are promised
    await call(be.submit, "job-9", spec(count=4, gpus=1), "team-a")
    op.advance(rayjob_name("job-9"), "Complete", "SUCCEEDED")  # finished: holds nothing
    foreign = build_rayjob("x", spec(count=4), "t", CONFIG)
    foreign["metadata"].update(name="not-shipyard", labels={})
    k8s.objects[op.key("rayjobs", "not-shipyard")] = foreign

    cap = await call(be.capacity)
    gib = 1024 ** 3
    assert (cap.cpus, cap.gpus, cap.memory) == (47.5, 4, 192 * gib)
    # job-7: head 1 CPU/4Gi + 2 x (2 CPU, 8Gi, 1 GPU); job-8: head + 1 worker
    assert (cap.free_cpus, cap.free_gpus, cap.free_memory) == (47.5 - 5 - 3, 4 - 3, (192 - 20 - 12) * gib)
    assert running


async def test_restart_reattaches_by_label(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    handles = {j: await call(be.submit, j, spec(), "team-a") for j in ("job-a", "Job_B")}
    foreign = build_rayjob("x", spec(), "t", CONFIG)
    foreign["metadata"].update(name="not-shipyard", labels={})
    k8s.objects[op.key("rayjobs", "not-shipyard")] = foreign
    op.advance(rayjob_name("job-a"), "Running", "RUNNING")

    restarted = backend(k8s)
    assert await call(restarted.list_jobs) == handles  # exact job ids, from the annotation
    listed = k8s["get", k8s.resource("ray.io/v1/rayjobs"), {"labelSelector": ...}]
    assert listed[-1].params["labelSelector"] == "app.kubernetes.io/managed-by=shipyard,shipyard.io/job-id"
    assert (await call(restarted.status, handles["job-a"])).state is State.RUNNING


async def test_logs_come_from_the_submitter_pod(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-10", spec(), "team-a")
    name = rayjob_name("job-10")
    assert await call(be.logs, handle) == ""  # nothing submitted yet
    op.pod(f"{name}-xyz12", {"job-name": name}, {"phase": "Running"})
    k8s["get", k8s.resource("v1/pods"), k8s.subresource("log")] << "step 10 loss 0.5\nstep 20 loss 0.4\n"
    assert await call(be.logs, handle, 50) == "step 10 loss 0.5\nstep 20 loss 0.4\n"
    log_req = k8s["get", k8s.resource("v1/pods"), k8s.subresource("log")][-1]
    assert log_req.url.path == f"/api/v1/namespaces/{NS}/pods/{name}-xyz12/log"
    assert log_req.params["tailLines"] == "50"


# -- isolation: a NetworkPolicy per job (kuberay_isolation.py) -------------------------------------

def posts(k8s, res: str) -> list:
    return list(k8s["post", k8s.resource(res)])


async def test_submit_creates_the_jobs_network_policy_owned_by_its_rayjob(k8s):
    be, op = backend(k8s, namespaces={"team-b": "team-b-jobs"}), FakeKubeRay(k8s)
    handle = await call(be.submit, "job-np", spec(), "team-a")
    name = rayjob_name("job-np")
    uid = op.rayjob(name)["metadata"]["uid"]
    create, = posts(k8s, POLICIES)
    assert create.url.path == f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
    assert create.params["fieldValidation"] == "Strict"
    assert create.data == network_policy(build_rayjob("job-np", spec(), "team-a", be.config), uid, be.config)
    assert create.data["metadata"]["ownerReferences"][0]["uid"] == uid  # the garbage collector deletes it with it

    # Submitting again (the server died before storing the handle) finds both and creates nothing.
    assert await call(be.submit, "job-np", spec(), "team-a") == handle
    assert len(posts(k8s, POLICIES)) == 2 and len(list(k8s.objects)) == 2  # the second create met a 409
    # A tenant with its own namespace gets its policy there; cancel deletes only the RayJob.
    b = await call(be.submit, "job-nb", spec(), "team-b")
    assert posts(k8s, POLICIES)[-1].url.path == "/apis/networking.k8s.io/v1/namespaces/team-b-jobs/networkpolicies"
    await call(be.cancel, b)
    assert not list(k8s["delete", k8s.resource(POLICIES)])


async def test_a_stale_policy_of_an_earlier_rayjob_is_replaced(k8s):
    """A requeued job's new RayJob has a new uid; the old one's policy, not yet garbage-collected,
    is deleted (with a uid precondition) and created again for the new owner."""
    be, op = backend(k8s), FakeKubeRay(k8s)
    name = rayjob_name("job-rq")
    old = network_policy(build_rayjob("job-rq", spec(), "team-a", CONFIG), "old-uid", CONFIG)
    old["metadata"]["uid"] = "policy-uid"
    k8s.objects[k8s.resource(POLICIES), NS, name] = old
    await call(be.submit, "job-rq", spec(), "team-a")
    delete, = k8s["delete", k8s.resource(POLICIES)]
    assert delete.data["preconditions"] == {"uid": "policy-uid"}
    stored = k8s.objects[k8s.resource(POLICIES), NS, name]
    assert stored["metadata"]["ownerReferences"][0]["uid"] == op.rayjob(name)["metadata"]["uid"] != "old-uid"


async def test_a_foreign_policy_of_the_same_name_fails_the_submit_and_is_left_alone(k8s):
    be, op = backend(k8s), FakeKubeRay(k8s)
    name = rayjob_name("job-fp")
    k8s.objects[k8s.resource(POLICIES), NS, name] = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": NS},
        "spec": {"podSelector": {}}}
    with pytest.raises(BackendError, match=rf"NetworkPolicy {NS}/{name}: one of that name exists and is not shipyard's"
                                           rf".*RayJob {NS}/{name} was deleted"):
        await call(be.submit, "job-fp", spec(), "team-a")
    assert not list(k8s["delete", k8s.resource(POLICIES)])
    assert len(list(k8s["delete", k8s.resource(RAYJOBS)])) == 1  # fail closed: no job without its policy


async def test_without_the_network_policy_api_jobs_run_with_one_warning(k8s, caplog):
    (k8s ** 1)["post", k8s.resource(POLICIES)] << 404 << {"kind": "Status", "code": 404, "reason": "NotFound",
                                                   "message": "the server could not find the requested resource"}
    (k8s ** 1)["get /apis/networking.k8s.io/v1"] << 404  # discovery: the group/version is not served
    be = backend(k8s)
    with caplog.at_level(logging.WARNING, logger="shipyard.backends.kuberay"):
        handles = [await call(be.submit, j, spec(), "team-a") for j in ("job-w1", "job-w2")]
    assert handles == [f"{NS}/{rayjob_name('job-w1')}", f"{NS}/{rayjob_name('job-w2')}"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NetworkPolicy API is not served" in warnings[0].getMessage()
    assert len(posts(k8s, POLICIES)) == 1  # not asked again
    assert not list(k8s["delete", k8s.resource(RAYJOBS)])  # the jobs run


async def test_a_forbidden_policy_create_names_the_rbac_rule_and_removes_the_rayjob(k8s):
    (k8s ** 1)["post", k8s.resource(POLICIES)] << 403 << {  # above the fixture's 201
        "kind": "Status", "code": 403, "reason": "Forbidden",
        "message": 'networkpolicies.networking.k8s.io is forbidden: User "system:serviceaccount:shipyard:shipyard" '
                   'cannot create resource "networkpolicies" in API group "networking.k8s.io" in the namespace "team-b-jobs"'}
    be = backend(k8s, namespaces={"team-b": "team-b-jobs"})
    with pytest.raises(BackendError) as err:
        await call(be.submit, "job-f", spec(), "team-b")
    msg = str(err.value)
    assert msg.startswith(f"cannot create NetworkPolicy team-b-jobs/{rayjob_name('job-f')}: HTTP 403: forbidden:")
    assert ('{apiGroups: ["networking.k8s.io"], resources: ["networkpolicies"], verbs: ["create"]} '
            "in a Role in namespace team-b-jobs") in msg  # the tenant's namespace, where the Role is missing
    assert "system:serviceaccount:shipyard:shipyard" in msg and "was deleted" in msg
    delete, = k8s["delete", k8s.resource(RAYJOBS)]
    assert delete.url.path.endswith(f"/namespaces/team-b-jobs/rayjobs/{rayjob_name('job-f')}")


async def test_network_policies_off_creates_none(k8s):
    be = backend(k8s, network_policy=False)
    await call(be.submit, "job-off", spec(), "team-a")
    assert not posts(k8s, POLICIES)
