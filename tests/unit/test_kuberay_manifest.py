"""The RayJob a job becomes, checked against KubeRay's real CRD schema (after its defaults).

The CRDs are data in ../shared/schemas/kuberay/ (or $SHIPYARD_CRD_DIR); tests that need them skip
with the reason when they are absent. CEL rules (x-kubernetes-validations) are not checked.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from shipyard.backends.base import SPEC_ENV, entrypoint_command
from shipyard.backends.kuberay_manifest import (
    GPU, GRACE_MARGIN_S, JOB_ID, KUEUE_QUEUE, MAX_NAME, RAYJOB, TENANT, KubeRayConfig, NodePool, build_rayjob, label_value, rayjob_name,
    rayjob_requests,
)
from shipyard.errors import SpecError
from shipyard.spec import JobSpec, spec_from_dict

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(os.environ.get("SHIPYARD_CRD_DIR", REPO.parent / "shared" / "schemas" / "kuberay"))
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
A100_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}]}]}}}
CONFIG = KubeRayConfig(
    image="registry.example.com/shipyard/worker:0.1.0", namespace="training", s3_secret="shipyard-s3",
    env={"SHIPYARD_S3_ENDPOINT": "http://minio.storage:9000"}, active_deadline_seconds=86400,
    pools={"a100": NodePool({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, [GPU_TOLERATION], A100_AFFINITY),
           "cpu": NodePool({"pool": "cpu"})},
    gpu_pool="a100", cpu_pool="cpu")


def strategy_kinds() -> list[str]:
    """Every strategy the JobSpec knows (ddp now; fsdp, horovod... as they are added)."""
    ann = JobSpec.model_fields["strategy"].annotation
    models = [a for a in typing.get_args(ann) if isinstance(a, type)] or [ann]
    return [typing.get_args(m.model_fields["kind"].annotation)[0] for m in models]


def make_spec(kind: str = "ddp", count: int = 4, cpus: float = 2.0, gpus: float = 0.0) -> JobSpec:
    return spec_from_dict(make_spec_dict(kind, count, cpus, gpus))


def make_spec_dict(kind: str = "ddp", count: int = 4, cpus: float = 2.0, gpus: float = 0.0) -> dict:
    return ({
        "name": "digits", "entrypoint": "train.py:train", "workdir": "/opt/shipyard/jobs/digits",
        "workers": {"count": count, "cpus": cpus, "gpus": gpus}, "strategy": {"kind": kind},
        "dataset": {"uri": "s3://data/digits"}, "checkpoint": {"uri": "s3://ckpt/digits", "every_steps": 10},
    })


# -- the CRD schema ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    path = CRD_DIR / "ray.io_rayjobs.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {path} (set SHIPYARD_CRD_DIR to a directory holding ray.io_rayjobs.yaml)")
    crd = yaml.safe_load(path.read_text())
    version, = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema: dict) -> dict:
    """Structural-schema semantics for jsonschema: objects with properties prune (here: reject)
    unknown fields unless x-kubernetes-preserve-unknown-fields says otherwise."""
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties",):
        if key in schema:
            schema[key] = {k: strict(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def apply_defaults(schema: dict, value):
    """What the API server does before validation: fill in every `default` of the schema."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(schema.get("properties") or {}):
                value[name] = apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def validate(schema: dict, obj: dict) -> dict:
    import jsonschema

    obj = apply_defaults(schema, copy.deepcopy(obj))
    jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
    return obj


@pytest.mark.parametrize("gpus", [0.0, 1.0], ids=["cpu", "gpu"])
@pytest.mark.parametrize("kind", strategy_kinds())
def test_rayjob_validates_against_the_crd(rayjob_schema, kind, gpus):
    obj = validate(rayjob_schema, build_rayjob("job-1", make_spec(kind, gpus=gpus), "team-a", CONFIG))
    assert obj["spec"]["submissionMode"] == "K8sJobMode"
    assert obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["numOfHosts"] == 1  # a CRD default applied


def test_schema_check_is_not_vacuous(rayjob_schema):
    import jsonschema

    obj = build_rayjob("job-1", make_spec(), "team-a", CONFIG)
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicaz"] = 3
    with pytest.raises(jsonschema.ValidationError, match="replicaz"):
        validate(rayjob_schema, obj)
    obj = build_rayjob("job-1", make_spec(), "team-a", CONFIG)
    obj["spec"]["ttlSecondsAfterFinished"] = "soon"
    with pytest.raises(jsonschema.ValidationError, match="soon"):
        validate(rayjob_schema, obj)


# -- what the manifest says ----------------------------------------------------------------------

def worker_group(obj: dict) -> dict:
    group, = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def test_gpu_workers_request_whole_gpus_on_the_gpu_pool():
    obj = build_rayjob("job-1", make_spec(count=8, cpus=1.5, gpus=1.0), "team-a", CONFIG)
    group = worker_group(obj)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "1500m", "memory": "8Gi", GPU: "1"}
    assert group["rayStartParams"] == {"num-cpus": "2", "num-gpus": "1"}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert pod["tolerations"] == [GPU_TOLERATION]
    assert pod["affinity"] == A100_AFFINITY
    head = obj["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no rank lands on the head
    assert head["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert GPU not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert rayjob_requests(obj).gpus == 8 and rayjob_requests(obj).cpus == 1 + 8 * 1.5


def test_an_elastic_range_is_an_autoscaled_worker_group_starting_at_min(rayjob_schema):
    raw = make_spec_dict(gpus=1.0)
    raw["workers"] = {"min": 2, "max": 8, "gpus": 1.0, "cpus": 2.0}
    obj = validate(rayjob_schema, build_rayjob("job-1", spec_from_dict(raw), "team-a", CONFIG))
    group = worker_group(obj)
    # Not replicas = max: the cluster starts at min and Ray's autoscaler adds pods up to max.
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 8)
    assert obj["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert rayjob_requests(obj).gpus == 2  # what the job holds at the start
    fixed = build_rayjob("job-1", make_spec(count=8), "team-a", CONFIG)
    assert "enableInTreeAutoscaling" not in fixed["spec"]["rayClusterSpec"]  # a fixed gang never scales


def test_pods_outlive_the_checkpoint_grace_before_kubernetes_kills_them():
    raw = make_spec_dict()
    raw["checkpoint"]["preemption_grace_s"] = 120.5
    obj = build_rayjob("job-1", spec_from_dict(raw), "team-a", CONFIG)
    rcs = obj["spec"]["rayClusterSpec"]
    periods = [rcs["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"],
               worker_group(obj)["template"]["spec"]["terminationGracePeriodSeconds"]]
    assert periods == [121 + GRACE_MARGIN_S] * 2
    # The default 30 s grace must not equal Kubernetes' default 30 s period (a kill mid-commit).
    default = build_rayjob("job-1", make_spec(), "team-a", CONFIG)
    assert worker_group(default)["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_a_kueue_queue_labels_the_rayjob_and_creates_it_suspended(rayjob_schema):
    config = KubeRayConfig(**{**CONFIG.__dict__, "queue": "team-a-gpus"})
    obj = validate(rayjob_schema, build_rayjob("job-1", make_spec(gpus=1.0), "team-a", config))
    assert obj["metadata"]["labels"][KUEUE_QUEUE] == "team-a-gpus"
    assert obj["spec"]["suspend"] is True  # Kueue unsuspends it when it admits the gang
    plain = build_rayjob("job-1", make_spec(), "team-a", CONFIG)
    assert KUEUE_QUEUE not in plain["metadata"]["labels"] and "suspend" not in plain["spec"]


def test_every_job_pod_runs_non_root_without_privileges_like_the_servers():
    chart = yaml.safe_load((REPO / "helm" / "shipyard" / "values.yaml").read_text())["server"]
    obj = build_rayjob("job-1", make_spec(gpus=1.0), "team-a", CONFIG)
    rcs = obj["spec"]["rayClusterSpec"]
    for pod in (rcs["headGroupSpec"]["template"]["spec"], worker_group(obj)["template"]["spec"]):
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        container, = pod["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        # The same settings as the chart's server pod, except the writable root (Ray's /tmp/ray).
        for key in ("allowPrivilegeEscalation", "capabilities"):
            assert container["securityContext"][key] == chart["securityContext"][key]
        for key in ("runAsNonRoot", "seccompProfile"):
            assert pod["securityContext"][key] == chart["podSecurityContext"][key]


def test_fractional_gpus_still_get_one_device_per_pod():
    res = worker_group(build_rayjob("j", make_spec(gpus=0.5), "t", CONFIG))["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"][GPU] == "1"


def test_cpu_workers_have_no_gpu_and_go_to_the_cpu_pool():
    group = worker_group(build_rayjob("job-1", make_spec(gpus=0), "team-a", CONFIG))
    pod = group["template"]["spec"]
    assert GPU not in pod["containers"][0]["resources"]["limits"]
    assert "num-gpus" not in group["rayStartParams"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in pod


def test_labels_annotations_lifecycle_and_env():
    spec = make_spec()
    obj = build_rayjob("Job_7", spec, "Team A", CONFIG)
    meta = obj["metadata"]
    assert meta["namespace"] == "training" and meta["name"] == rayjob_name("Job_7")
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "shipyard", JOB_ID: "Job_7", TENANT: "Team-A"}
    assert meta["annotations"] == {JOB_ID: "Job_7", TENANT: "Team A"}  # exact values, for re-attach
    s = obj["spec"]
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] == 3600
    assert s["activeDeadlineSeconds"] == 86400 and s["backoffLimit"] == 0
    assert s["entrypoint"] == entrypoint_command("Job_7")
    for role, tmpl in [("head", s["rayClusterSpec"]["headGroupSpec"]["template"]), ("worker", worker_group(obj)["template"])]:
        assert tmpl["metadata"]["labels"][RAYJOB] == meta["name"], role
        c = tmpl["spec"]["containers"][0]
        assert c["image"] == CONFIG.image
        assert c["envFrom"] == [{"secretRef": {"name": "shipyard-s3"}}], role
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["SHIPYARD_S3_ENDPOINT"] == "http://minio.storage:9000"
        assert (SPEC_ENV in env) == (role == "head")  # the driver runs on the head only
        if role == "head":
            assert JobSpec.model_validate_json(env[SPEC_ENV]) == spec


PACKAGE = "sha256:" + "ab" * 32
PACKAGE_URI = "s3://packages/shipyard/team-a/" + "ab" * 32 + ".zip"


def test_a_code_package_in_object_storage_is_the_working_dir(rayjob_schema):
    spec = make_spec().model_copy(update={"package": PACKAGE})
    obj = validate(rayjob_schema, build_rayjob("job-1", spec, "team-a", CONFIG, package_uri=PACKAGE_URI))
    assert yaml.safe_load(obj["spec"]["runtimeEnvYAML"]) == {"working_dir": PACKAGE_URI}
    for tmpl in (obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"], worker_group(obj)["template"]):
        env = {e["name"]: e["value"] for e in tmpl["spec"]["containers"][0]["env"]}
        # Ray downloads an s3:// working_dir with boto3, which reads this, not SHIPYARD_S3_ENDPOINT.
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000"
    head_env = {e["name"]: e["value"] for e in obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                ["containers"][0]["env"]}
    driver_spec = JobSpec.model_validate_json(head_env[SPEC_ENV])
    assert driver_spec.workdir == "." and driver_spec.package == PACKAGE  # the driver runs in the unpacked package


def test_without_a_package_the_workdir_is_the_images_and_there_is_no_runtime_env():
    obj = build_rayjob("job-1", make_spec(), "team-a", CONFIG)
    assert "runtimeEnvYAML" not in obj["spec"]
    head_env = {e["name"]: e["value"] for e in obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                ["containers"][0]["env"]}
    assert JobSpec.model_validate_json(head_env[SPEC_ENV]).workdir == "/opt/shipyard/jobs/digits"
    assert "AWS_ENDPOINT_URL_S3" not in head_env
    with pytest.raises(ValueError, match="object storage"):
        build_rayjob("job-1", make_spec(), "team-a", CONFIG, package_uri="/srv/packages/a.zip")


def test_names_are_valid_and_stable():
    assert rayjob_name("42") == "sy-42"
    long = rayjob_name("x" * 100)
    assert len(long) <= MAX_NAME and long == rayjob_name("x" * 100) and long != rayjob_name("x" * 99)
    assert rayjob_name("A_b") != rayjob_name("a-b")  # sanitising never merges two jobs
    assert label_value("-" + "a" * 80) == "a" * 63


def test_local_paths_are_refused_naming_the_field():
    raw = make_spec().model_dump()
    raw["checkpoint"]["uri"] = "/home/me/ckpt"
    with pytest.raises(SpecError, match=r"checkpoint\.uri: got '/home/me/ckpt'.*s3://"):
        build_rayjob("j", spec_from_dict(raw), "t", CONFIG)


def test_a_tenant_namespace_must_be_a_dns_label():
    config = KubeRayConfig.from_dict({"image": "i", "namespaces": {"team-b": "shipyard-team-b"}})
    assert build_rayjob("j", make_spec(), "team-b", config)["metadata"]["namespace"] == "shipyard-team-b"
    assert build_rayjob("j", make_spec(), "team-a", config)["metadata"]["namespace"] == "default"
    with pytest.raises(ValueError, match="namespaces.team-b: got 'Team_B'; a namespace is a DNS label"):
        KubeRayConfig.from_dict({"image": "i", "namespaces": {"team-b": "Team_B"}})


def test_config_from_dict_rejects_unknown_keys_and_pools():
    assert KubeRayConfig.from_dict({"image": "i", "pools": {"a": {"node_selector": {"x": "y"}}}, "gpu_pool": "a"}).pools["a"].node_selector == {"x": "y"}
    with pytest.raises(ValueError, match="imagee"):
        KubeRayConfig.from_dict({"image": "i", "imagee": "j"})
    with pytest.raises(ValueError, match="gpu_pool 'h100' is not in pools"):
        KubeRayConfig.from_dict({"image": "i", "gpu_pool": "h100"})


def test_entrypoint_runs_shipyard_run_on_the_spec_from_the_environment(tmp_path):
    """The command really hands `shipyard run` a file that load_spec reads back to the same spec."""
    spec = make_spec()
    stub = tmp_path / "bin" / "shipyard"
    stub.parent.mkdir()
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys, json; from shipyard.spec import load_spec; "
                    f"print(json.dumps([sys.argv[1:], load_spec(sys.argv[2], sys.argv[4:][:1]).model_dump(mode=\"json\")]))' \"$@\"\n")
    stub.chmod(0o755)
    # the file entrypoint must exist under workdir for load_spec; use a module entrypoint instead
    spec = spec.model_copy(update={"entrypoint": "train:train"})
    cmd = entrypoint_command("job/1", ["workers.count=2"])
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           SPEC_ENV: spec.model_dump_json()}
    out = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, check=True).stdout
    argv, loaded = json.loads(out)
    assert argv == ["run", str(tmp_path / "shipyard-job-job_1.json"), "--set", "workers.count=2"]
    assert loaded == {**spec.model_dump(mode="json"), "workers": {**spec.workers.model_dump(), "count": 2}}
