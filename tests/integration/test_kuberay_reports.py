"""Jobs on Kubernetes report to the server like local ones (issue 21 item 2).

The kuberay backend against kmock (a fake Kubernetes API over HTTP, which serves Secrets; the
real-API tier serves the RayJob CRD only): the report Secret is created before the RayJob, given
it as owner, deleted again when the submit fails, kept up to date by a resubmit, and never
another job's. Then the run itself: a real ``shipyard server --backend kuberay`` (a subprocess,
talking to kmock) submits a job; the test plays the kubelet and KubeRay: it takes the head
container's environment from the RayJob the server created (the token resolved from the Secret,
``$(...)`` expanded as the kubelet does) and runs the RayJob's ``spec.entrypoint`` with ``sh -c``,
joined to the session's real Ray, with data and checkpoints on S3 (moto). The server must record
that run from the driver's own reports. And the eviction path: the head container's preStop
hook, run as the kubelet runs it, stops the driver, whose workers commit a checkpoint first.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import yaml
from kubernetes import client

from conftest import REPO, Server
from shipyard.backends.base import DRIVER_PIDFILE_ENV, BackendError, JobEnv
from shipyard.backends.kuberay import KubeRayBackend
from shipyard.backends.kuberay_manifest import JOB_ID, KubeRayConfig, rayjob_name, report_secret_name
from shipyard.spec import spec_from_dict

pytest.importorskip("kmock", reason="kmock (a fake Kubernetes API for pods, events, nodes and Secrets) is a dev dependency: pip install -e '.[dev]'")
from kmock import Response  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]

NS = "training"
UID = "8d3c5a2e-1f0b-4c7e-9a51-3b2f6e4d7c10"
CONFIG = KubeRayConfig(image="registry.example.com/shipyard/worker:0.1.0", namespace=NS)
JOBS = REPO / "tests" / "integration" / "jobs"
FORBIDDEN = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
             "message": 'secrets is forbidden: User "system:serviceaccount:shipyard:shipyard" cannot patch '
                        'resource "secrets" in API group "" in the namespace "training"'}


def env_of(token: str) -> JobEnv:
    return JobEnv(plain={"SHIPYARD_REPORT_URL": "http://shipyard:8321/v1/jobs/job-1/report"},
                  secret={"SHIPYARD_REPORT_TOKEN": token})


def spec():
    return spec_from_dict({"name": "digits", "entrypoint": "train:train", "workdir": "/opt/jobs/digits",
                           "workers": {"count": 2, "cpus": 1}, "dataset": {"uri": "s3://data/digits"},
                           "checkpoint": {"uri": "s3://ckpt/digits"}})


@pytest.fixture
def fail() -> dict[tuple[str, str], int]:
    """``fail[(method, plural)] = status``: that call to kmock answers with a Status error."""
    return {}


@pytest.fixture
def k8s(kmock, fail):
    """kmock serving RayJobs, Secrets, pods, events and nodes. A create answers 201 with the
    stored object and a uid, as the API server does (see :func:`fail` for errors)."""
    for res, kind, namespaced in [("ray.io/v1/rayjobs", "RayJob", True), ("v1/secrets", "Secret", True),
                                  ("v1/pods", "Pod", True), ("v1/events", "Event", True), ("v1/nodes", "Node", False)]:
        kmock.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=namespaced)

    def answer(method: str, plural: str, created: bool):
        def react(req):
            status = fail.get((method, plural))
            if status:
                return Response(status=status, payload={**FORBIDDEN, "code": status})
            if not created:
                return NotImplemented  # the emulator's own answer
            k = (req.resource, req.data["metadata"].get("namespace") or NS, req.data["metadata"]["name"])
            kmock.objects[k].patch({"metadata": {"uid": UID if plural == "rayjobs" else "secret-uid",
                                                 "creationTimestamp": now()}})
            return Response(status=201, payload=kmock.objects[k].raw)
        return react

    for plural, res in (("rayjobs", "ray.io/v1/rayjobs"), ("secrets", "v1/secrets")):
        kmock["post", kmock.resource(res)] << answer("post", plural, True)
        kmock["patch", kmock.resource(res)] << answer("patch", plural, False)
        kmock["delete", kmock.resource(res)] << answer("delete", plural, False)
    return kmock


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key(k8s, plural: str, name: str, ns: str | None = NS):
    return k8s.resource("ray.io/v1/rayjobs" if plural == "rayjobs" else f"v1/{plural}"), ns, name


def stored(k8s, plural: str, name: str) -> dict | None:
    k = key(k8s, plural, name)
    return None if k not in k8s.objects or k8s.objects[k].deleted else k8s.objects[k].raw


def backend(k8s) -> KubeRayBackend:
    return KubeRayBackend(CONFIG, api_client=client.ApiClient(client.Configuration(host=str(k8s.url).rstrip("/"))))


def call(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


# -- the report Secret's lifecycle (kmock) -----------------------------------------------------

async def test_the_secret_comes_first_and_is_owned_by_the_rayjob(k8s):
    name = rayjob_name("job-1")
    seen: list[str] = []
    handle = await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: seen.append(s) or env_of(f"tok-{s}"))
    assert handle == seen[0] == f"{NS}/{name}"  # the token is bound to the handle the server stores
    calls = [(r.method.lower(), r.url.path.rsplit("/", 2)[-2:]) for r in k8s if r.method.lower() in ("post", "patch")]
    assert [(m, p[-1] if m == "post" else p[0]) for m, p in calls] == [
        ("post", "secrets"), ("post", "rayjobs"), ("patch", "secrets"),  # no pod ever waits for its Secret
        ("post", "networkpolicies")]  # owned by the RayJob, so it needs the RayJob's uid
    secret = stored(k8s, "secrets", report_secret_name(name))
    assert base64.b64decode(secret["data"]["SHIPYARD_REPORT_TOKEN"]).decode() == f"tok-{handle}"
    assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name,
                                                      "uid": UID}]
    assert secret["metadata"]["labels"] == stored(k8s, "rayjobs", name)["metadata"]["labels"]
    assert f"tok-{handle}" not in json.dumps(stored(k8s, "rayjobs", name))

    # A resubmit (the server died before storing the handle; now with a new report key) re-attaches
    # and brings the Secret up to date, owner included.
    assert await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("tok-new")) == handle
    secret = stored(k8s, "secrets", report_secret_name(name))
    assert base64.b64decode(secret["data"]["SHIPYARD_REPORT_TOKEN"]).decode() == "tok-new"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == UID
    # Without secret variables (a backend used on its own) there is no Secret at all.
    await call(backend(k8s).submit, "job-2", spec(), "team-a")
    assert stored(k8s, "secrets", report_secret_name(rayjob_name("job-2"))) is None


async def test_a_failed_submit_leaves_nothing_behind(k8s, fail):
    name = rayjob_name("job-1")
    fail[("post", "rayjobs")] = 422
    with pytest.raises(BackendError, match=f"cannot create RayJob {NS}/{name}: HTTP 422"):
        await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("t"))
    assert stored(k8s, "secrets", report_secret_name(name)) is None  # created first, deleted again

    fail.clear()
    k8s.objects.clear()
    fail[("patch", "secrets")] = 403  # the RayJob exists, but the Secret cannot be given it as owner
    with pytest.raises(BackendError) as err:
        await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("t"))
    assert f"cannot patch Secret {NS}/{name}-report: HTTP 403: forbidden" in str(err.value)
    assert 'apiGroups: [""], resources: ["secrets"], verbs: ["patch"]} in a Role' in str(err.value)
    assert stored(k8s, "rayjobs", name) is None and stored(k8s, "secrets", report_secret_name(name)) is None

    fail.clear()
    k8s.objects.clear()
    fail[("post", "secrets")] = 403
    before = len(list(k8s))
    with pytest.raises(BackendError, match=r'resources: \["secrets"\], verbs: \["create"\]'):
        await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("t"))
    assert not [r for r in list(k8s)[before:] if r.method.lower() == "post" and r.url.path.endswith("/rayjobs")]

    # One left by an earlier submit of this job (the server died before the RayJob) goes too.
    fail.clear()
    fail[("post", "rayjobs")] = 422
    k8s.objects.clear()  # kmock keeps even a create it answered with an error
    k8s.objects[key(k8s, "secrets", report_secret_name(name))] = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": report_secret_name(name), "namespace": NS,
                                                           "annotations": {JOB_ID: "job-1"}}, "data": {"OLD": "eA=="}}
    with pytest.raises(BackendError, match="HTTP 422"):
        await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("t"))
    assert stored(k8s, "secrets", report_secret_name(name)) is None


async def test_another_jobs_secret_is_never_overwritten(k8s):
    name = rayjob_name("job-1")
    theirs = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": report_secret_name(name), "namespace": NS,
                                                                 "annotations": {JOB_ID: "someone-else"}},
              "data": {"SHIPYARD_REPORT_TOKEN": base64.b64encode(b"theirs").decode()}}
    k8s.objects[key(k8s, "secrets", report_secret_name(name))] = theirs
    with pytest.raises(BackendError, match="already exists for job 'someone-else', not 'job-1'"):
        await call(backend(k8s).submit, "job-1", spec(), "team-a", env=lambda s: env_of("mine"))
    assert stored(k8s, "secrets", report_secret_name(name))["data"] == theirs["data"]
    assert stored(k8s, "rayjobs", name) is None


# -- the run: a real server, the RayJob's own entrypoint and environment, real Ray and S3 --------

def kubelet_env(container: dict, secrets: dict[str, dict]) -> dict[str, str]:
    """A container's environment as the kubelet makes it: values with ``$(NAME)`` expanded from
    the variables before them (``$$`` is a literal ``$``), secretKeyRef values read from the
    Secret's ``data`` (base64)."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
            continue

        def one(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return env.get(m.group(1), m.group(0))

        env[e["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, e.get("value", ""))
    return env


@pytest_asyncio.fixture
async def kuberay_server(k8s, tmp_path, s3_endpoint, bucket):
    """``shipyard server --backend kuberay`` on kmock (kubeconfig), the tenant's S3 credentials
    in its env file, its storage root the test's bucket; kmock has one node of 16 CPUs."""
    k8s.objects[key(k8s, "nodes", "node-1", None)] = {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "status": {"allocatable": {"cpu": "16", "memory": "64Gi"}, "conditions": [{"type": "Ready", "status": "True"}]}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "shipyard", "user": {"token": "t"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "shipyard"}}]}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"kuberay": {
        "image": "registry.example.com/shipyard/worker:0.1.0", "namespace": NS,
        "env": {"SHIPYARD_S3_ENDPOINT": s3_endpoint}, "head_memory": "1Gi", "worker_memory": "1Gi"}}))
    data_dir = tmp_path / "server"
    (data_dir / "tenants").mkdir(parents=True)
    (data_dir / "tenants" / "default.env").write_text(
        "AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\nAWS_DEFAULT_REGION=us-east-1\n")
    env = {**os.environ, "SHIPYARD_CONFIG": str(config), "KUBECONFIG": str(kubeconfig), "NO_COLOR": "1",
           "SHIPYARD_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    server = Server(data_dir, "127.0.0.1:1", env, roots=(f"s3://{bucket}/",), args=("--backend", "kuberay"))
    await asyncio.to_thread(server.start)  # kmock answers the server meanwhile, on this loop
    yield server
    if server.proc.poll() is None:
        await asyncio.to_thread(server.stop)


async def start_job(k8s, kuberay_server, bucket, tmp_path, **changes) -> tuple[Server, str, dict, str]:
    """The server up, a job submitted to it, and the RayJob it created: (server, job id, the head
    container's environment as the kubelet makes it, the RayJob)."""
    from shipyard.data.sources import open_source
    from shipyard.data.writer import write_dataset

    server = kuberay_server
    await asyncio.to_thread(write_dataset, open_source("sklearn:digits:train"), f"s3://{bucket}/digits",
                            rows_per_shard=300)
    out = tmp_path / "out"
    out.mkdir()
    body = {"name": "record-ids", "entrypoint": "record_ids.train:train", "workers": {"count": 2, "cpus": 1},
            "dataset": {"uri": f"s3://{bucket}/digits", "batch_size": 32, "epochs": 1},
            "checkpoint": {"uri": f"s3://{bucket}/ck", "every_steps": 10}, "max_failures": 0,
            "config": {"out": str(out)},
            # Stands for the worker image, where module:function code is installed: the job's
            # module is on the workers' path (the session's Ray workers are this machine's).
            "env": {"PYTHONPATH": os.pathsep.join(p for p in (str(JOBS), os.environ.get("PYTHONPATH")) if p)}}
    for k, v in changes.items():
        body[k] = {**body[k], **v} if isinstance(v, dict) else v
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as http:
        r = await http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    name = rayjob_name(job_id)
    deadline = time.monotonic() + 30
    while (rayjob := stored(k8s, "rayjobs", name)) is None or not (
            stored(k8s, "secrets", report_secret_name(name)) or {}).get("metadata", {}).get("ownerReferences"):
        assert time.monotonic() < deadline, server.logs.read_text()[-3000:]
        await asyncio.sleep(0.2)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    secrets = {report_secret_name(name): stored(k8s, "secrets", report_secret_name(name))}
    return server, job_id, kubelet_env(head, secrets), rayjob


def driver(rayjob: dict, container_env: dict, ray_address: str, tmp_path: Path) -> subprocess.Popen:
    """The RayJob's entrypoint as Ray's job supervisor on the head runs it: ``sh -c``, with the head
    container's environment (nothing of this test's: no AWS_*, no SHIPYARD_*) and RAY_ADDRESS. Its
    working directory stands for the image's, where the job's module is."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_", "AWS_", "RAY_ADDRESS"))}
    env = {**base, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           **container_env, "RAY_ADDRESS": ray_address}
    env[DRIVER_PIDFILE_ENV] = container_env[DRIVER_PIDFILE_ENV] = str(tmp_path / "driver.pid")  # a pod's /tmp is its own
    log = open(tmp_path / "driver.log", "w")
    return subprocess.Popen(["sh", "-c", rayjob["spec"]["entrypoint"]], cwd=JOBS, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


async def get_job(server: Server, job_id: str) -> dict:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as http:
        r = await http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()


async def wait_job(server: Server, job_id: str, ok, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not ok(job := await get_job(server, job_id)):
        assert time.monotonic() < deadline, json.dumps(job)[:3000]
        await asyncio.sleep(0.3)
    return job


async def test_a_driver_started_from_the_rayjob_reports_to_the_server(k8s, kuberay_server, bucket, tmp_path,
                                                                     ray_address):
    server, job_id, env, rayjob = await start_job(k8s, kuberay_server, bucket, tmp_path)
    name = rayjob_name(job_id)
    assert env["SHIPYARD_SUBMISSION"] == f"{NS}/{name}" and env["SHIPYARD_REPORT_URL"].startswith(server.url)
    assert env["AWS_SECRET_ACCESS_KEY"] == "testing"  # the tenant's credentials, from the Secret
    proc = driver(rayjob, env, ray_address, tmp_path)
    try:
        rc = await asyncio.to_thread(proc.wait, 120)
    finally:
        proc.kill()
    assert rc == 0, (tmp_path / "driver.log").read_text()[-3000:]
    job = await wait_job(server, job_id, lambda j: j["attempts"] and j["attempts"][-1]["kind"])
    assert [(a["number"], a["kind"]) for a in job["attempts"]] == [(1, "finished")]
    assert (job["step"], job["total_steps"]) == (23, 23) and "loss" in job["metrics"]
    assert job["checkpoint"].endswith("step-000000023") and job["state"] == "RUNNING"  # reports never end a job
    # KubeRay then says the Ray job succeeded; the server ends the job with the run the driver reported.
    k8s.objects[key(k8s, "rayjobs", name)].patch({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}})
    job = await wait_job(server, job_id, lambda j: j["state"] != "RUNNING")
    assert job["state"] == "SUCCEEDED" and job["backend_handle"] == f"{NS}/{name}", json.dumps(job)[:3000]
    states = [e["message"].split(":")[0] for e in job["events"] if e["kind"] == "state"]
    assert states == ["QUEUED -> ADMITTED", "ADMITTED -> RUNNING", "RUNNING -> SUCCEEDED"], states


async def test_an_evicted_head_pod_stops_the_driver_after_a_checkpoint(k8s, kuberay_server, bucket, tmp_path,
                                                                      ray_address):
    """The kubelet signals only the head container's PID 1 (``ray start --block``, which would
    take the driver down with Ray); first it runs the container's preStop hook, which is what stops
    the driver: SIGINT, its workers checkpoint, it reports the run preempted and exits."""
    server, job_id, env, rayjob = await start_job(
        k8s, kuberay_server, bucket, tmp_path, dataset={"epochs": 40}, checkpoint={"every_steps": 1000},
        config={"out": str(tmp_path / "out"), "step_sleep_s": 0.05})
    proc = driver(rayjob, env, ray_address, tmp_path)
    try:
        rank0 = tmp_path / "out" / "rank0.jsonl"
        deadline = time.monotonic() + 90
        while not rank0.exists() or len(rank0.read_text().splitlines()) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            await asyncio.sleep(0.3)
        pre_stop = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "lifecycle"]["preStop"]["exec"]["command"]
        hook = asyncio.to_thread(subprocess.run, pre_stop, env={"PATH": "/usr/bin:/bin", **env}, timeout=90)
        rc, hooked = await asyncio.gather(asyncio.to_thread(proc.wait, 90), hook)
    finally:
        proc.kill()
    text = (tmp_path / "driver.log").read_text()
    # The hook returned once the driver was gone; 143: stopped with its checkpoint committed (runtime/report.py).
    assert hooked.returncode == 0 and rc == 143, text[-3000:]
    assert "stop requested (SIGINT)" in text and "stop: SIGTERM sent to 2 worker processes" in text, text[-3000:]
    assert "checkpoint committed" in text, text[-3000:]
    from shipyard.checkpoint import CheckpointStore

    latest = CheckpointStore(f"s3://{bucket}/ck").latest()
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "rank0.jsonl").read_text().splitlines()]
    assert latest is not None and latest.step >= 5 and latest.step in steps  # every_steps=1000: saved on the stop
    job = await wait_job(server, job_id, lambda j: j["attempts"] and j["attempts"][-1]["kind"])
    assert [(a["number"], a["kind"]) for a in job["attempts"]] == [(1, "preempted")], json.dumps(job)[:3000]
    assert job["checkpoint"].endswith(f"step-{latest.step:09d}")
