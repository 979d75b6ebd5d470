"""What a RayJob's driver gets from the server (issue 21 item 2): the report URL and roots as
values on the head container, the report token and the tenant's variables only as references to
the job's report Secret, which is checked against the real Kubernetes schema (kubernetes_validate)
with the owner reference that lets Kubernetes delete it with the RayJob. And the head's preStop
hook, run for real against a process."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time

import pytest

from shipyard.api.auth import report_token
from shipyard.api.serve import make_job_env
from shipyard.backends.base import DRIVER_PIDFILE_ENV, JobEnv
from shipyard.backends.kuberay_manifest import (
    JOB_ID, KUEUE_QUEUE, MAX_SECRET_BYTES, PRESTOP, KubeRayConfig, build_rayjob, owner_reference, rayjob_name,
    report_secret,
)
from test_kuberay_manifest import CONFIG, make_spec, rayjob_schema, validate  # noqa: F401 - rayjob_schema: a fixture

K8S = "1.33"
TOKEN = "shr_training/sy-job-1.0123456789abcdef"
AWS_SECRET = "tenant-secret-key-9f2c"
ENV = JobEnv(plain={"SHIPYARD_REPORT_URL": "http://shipyard.shipyard:8321/v1/jobs/job-1/report",
                    "SHIPYARD_STORAGE_ROOTS": '[{"uri": "s3://team-a/", "writable": true}]'},
             secret={"SHIPYARD_REPORT_TOKEN": TOKEN, "AWS_SECRET_ACCESS_KEY": AWS_SECRET})


def kubernetes_validate(obj: dict) -> None:
    import kubernetes_validate as kv

    kv.validate(obj, K8S, strict=True)  # raises ValidationError naming the path


def containers(obj: dict) -> dict[str, dict]:
    rcs = obj["spec"]["rayClusterSpec"]
    return {"head": rcs["headGroupSpec"]["template"]["spec"]["containers"][0],
            "worker": rcs["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]}


def test_the_rayjob_with_the_servers_env_validates_against_the_crd(rayjob_schema):
    obj = validate(rayjob_schema, build_rayjob("job-1", make_spec(), "team-a", CONFIG, env=ENV))
    assert containers(obj)["head"]["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", PRESTOP]


def test_the_head_gets_the_servers_values_and_the_token_only_as_a_secret_reference():
    spec = make_spec()
    obj = build_rayjob("job-1", spec, "team-a", CONFIG, env=ENV)
    name = rayjob_name("job-1")
    head, worker = containers(obj).values()
    values = {e["name"]: e["value"] for e in head["env"] if "value" in e}
    refs = {e["name"]: e["valueFrom"] for e in head["env"] if "valueFrom" in e}
    assert values["SHIPYARD_REPORT_URL"] == ENV.plain["SHIPYARD_REPORT_URL"]
    assert values["SHIPYARD_STORAGE_ROOTS"] == ENV.plain["SHIPYARD_STORAGE_ROOTS"]
    # The submission the token is bound to is the handle the server stores and checks reports against.
    assert values["SHIPYARD_JOB_ID"] == "job-1" and values["SHIPYARD_SUBMISSION"] == f"training/{name}"
    assert values["RAY_JOB_STOP_SIGNAL"] == "SIGINT"  # for Ray's job supervisor, which reads its own environment
    assert int(values["RAY_JOB_STOP_WAIT_TIME_S"]) > spec.checkpoint.preemption_grace_s
    assert values[DRIVER_PIDFILE_ENV].startswith("/")
    assert refs == {k: {"secretKeyRef": {"name": f"{name}-report", "key": k}}
                    for k in ("SHIPYARD_REPORT_TOKEN", "AWS_SECRET_ACCESS_KEY")}
    text = json.dumps(obj)
    assert TOKEN not in text and AWS_SECRET not in text  # nothing secret anywhere in the RayJob
    worker_names = {e["name"] for e in worker["env"]}
    assert not worker_names & {"SHIPYARD_REPORT_TOKEN", "SHIPYARD_REPORT_URL", "SHIPYARD_SUBMISSION"}
    assert head["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", PRESTOP]
    assert "lifecycle" not in worker
    # The head pod as the kubelet gets it: a valid Pod to the real schema (secretKeyRef, preStop).
    template = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    kubernetes_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "head", **template["metadata"]},
                         "spec": template["spec"]})


def test_the_secret_holds_the_values_and_is_owned_by_the_rayjob():
    obj = build_rayjob("job-1", make_spec(), "team-a", CONFIG, env=ENV)
    secret = report_secret(obj, ENV)
    kubernetes_validate(secret)
    meta = secret["metadata"]
    assert (meta["name"], meta["namespace"]) == (f"{rayjob_name('job-1')}-report", "training")
    assert meta["labels"] == obj["metadata"]["labels"] and meta["annotations"][JOB_ID] == "job-1"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == dict(ENV.secret)
    created = {**obj, "metadata": {**obj["metadata"], "uid": "5a1c3e0e-7b7e-4a36-a7a4-6f1b8f0c2d11"}}
    ref = owner_reference(created)
    assert ref == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": rayjob_name("job-1"),
                   "uid": "5a1c3e0e-7b7e-4a36-a7a4-6f1b8f0c2d11"}
    kubernetes_validate({**secret, "metadata": {**meta, "ownerReferences": [ref]}})
    with pytest.raises(ValueError, match="no metadata.uid"):
        owner_reference(obj)  # only the API server's answer has the uid
    # A Kueue-queued job's Secret is not labelled for Kueue: it admits workloads, not Secrets.
    queued = build_rayjob("job-1", make_spec(), "team-a", KubeRayConfig(image="i", queue="gpus"), env=ENV)
    assert KUEUE_QUEUE in queued["metadata"]["labels"]
    assert KUEUE_QUEUE not in report_secret(queued, ENV)["metadata"]["labels"]


def test_values_reach_the_driver_as_written_although_the_kubelet_expands_dollar_parentheses():
    env = JobEnv(plain={"SHIPYARD_REPORT_URL": "http://h/$(HOME)/$$x"}, secret={"SHIPYARD_REPORT_TOKEN": "t"})
    head = containers(build_rayjob("job-1", make_spec(), "team-a", CONFIG, env=env))["head"]
    values = {e["name"]: e["value"] for e in head["env"] if "value" in e}
    assert values["SHIPYARD_REPORT_URL"] == "http://h/$$(HOME)/$$$$x"  # the kubelet makes it http://h/$(HOME)/$$x
    assert values["SHIPYARD_S3_ENDPOINT"] == CONFIG.env["SHIPYARD_S3_ENDPOINT"]  # the admin's own env: as written


@pytest.mark.parametrize("env, message", [
    (JobEnv(secret={"AWS-KEY": "x"}), "variable 'AWS-KEY' is not a valid name"),
    (JobEnv(plain={"SHIPYARD_SUBMISSION": "other"}), "SHIPYARD_SUBMISSION is set by the backend itself"),
    (JobEnv(secret={"BIG": "x" * (MAX_SECRET_BYTES + 1)}), f"at most {MAX_SECRET_BYTES}"),
], ids=["bad-name", "reserved", "too-large"])
def test_bad_variables_are_refused_naming_them(env, message):
    with pytest.raises(ValueError, match=message):
        build_rayjob("job-1", make_spec(), "team-a", CONFIG, env=env)


def test_the_servers_env_is_one_record_for_every_backend(tmp_path):
    (tmp_path / "tenants").mkdir()
    (tmp_path / "tenants" / "default.env").write_text(
        "AWS_SECRET_ACCESS_KEY=tk\nSHIPYARD_REPORT_URL=http://evil\nSHIPYARD_SUBMISSION=x\nSHIPYARD_REPORT_TOKEN=forged\n")
    env = make_job_env(b"key", "http://srv:8321", tmp_path)("job-1", "training/sy-job-1")
    assert env.plain == {"SHIPYARD_REPORT_URL": "http://srv:8321/v1/jobs/job-1/report"}
    # The token is bound to the submission; the tenant cannot replace the server's variables.
    assert env.secret == {"AWS_SECRET_ACCESS_KEY": "tk",
                          "SHIPYARD_REPORT_TOKEN": report_token(b"key", "job-1", "training/sy-job-1")}
    with pytest.raises(ValueError, match="both plain and secret"):
        JobEnv(plain={"A": "1"}, secret={"A": "2"})


# -- the head container's preStop hook, for real -----------------------------------------------

DRIVER = """
import os, signal, sys, time
from shipyard.runtime.report import write_pidfile
write_pidfile(sys.argv[1])  # as the driver does when SHIPYARD_DRIVER_PIDFILE is set
def stop(signum, frame):
    time.sleep(1)  # the checkpoint
    print(signal.Signals(signum).name, flush=True)
    os._exit(143)
signal.signal(signal.SIGINT, stop)
time.sleep(60)
"""


def start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def test_prestop_stops_the_driver_and_waits_for_it(tmp_path):
    pidfile = tmp_path / "driver.pid"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(pidfile)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.05)
        assert pidfile.read_text() == f"{driver.pid} {start_time(driver.pid)}\n"
        hook = subprocess.Popen(["/bin/sh", "-c", PRESTOP], env={"PATH": "/usr/bin:/bin", DRIVER_PIDFILE_ENV: str(pidfile)})
        assert driver.wait(20) == 143 and driver.stdout.read().strip() == "SIGINT"
        assert hook.wait(20) == 0  # returned once the driver was gone (Kubernetes then SIGTERMs PID 1)
    finally:
        driver.kill()


def test_prestop_leaves_other_processes_alone(tmp_path):
    other = subprocess.Popen(["sleep", "30"])  # a pid the driver left behind, now another process's
    try:
        files = {"reused.pid": f"{other.pid} {int(start_time(other.pid)) - 1}\n", "garbage.pid": f"{other.pid}; x\n",
                 "pid-only.pid": f"{other.pid}\n"}
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        for pidfile in [*files, "missing.pid"]:
            r = subprocess.run(["/bin/sh", "-c", PRESTOP], timeout=20,
                               env={"PATH": "/usr/bin:/bin", DRIVER_PIDFILE_ENV: str(tmp_path / pidfile)})
            assert r.returncode == 0 and other.poll() is None, pidfile
        r = subprocess.run(["/bin/sh", "-c", PRESTOP], env={"PATH": "/usr/bin:/bin"}, timeout=20)  # none set
        assert r.returncode == 0 and other.poll() is None
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(10)
