"""``/v1/packages`` and a submit naming a package, through FastAPI's TestClient over a SQLite
store (no Ray): upload round trip, digest and size checks, unsafe zips, tenant isolation."""

from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.package import pack
from shipyard.packages import PackageLimits, PackageStore
from shipyard.store import Store

CAP = 1 << 20


@pytest.fixture
def api(tmp_path):
    store = Store.open(data_dir=tmp_path)
    for tenant in ("a", "b"):
        store.create_tenant(tenant)
    tokens = {"a": store.create_token("a")[0], "b": store.create_token("b")[0]}
    packages = PackageStore(tmp_path / "packages", PackageLimits(max_bytes=CAP))
    # The API's own body cap (64 KB) is far below the package cap: package routes have their own.
    client = TestClient(create_app(store, config=ApiConfig(report_key=b"k", max_body_bytes=64_000), packages=packages))
    client.tokens, client.packages = tokens, packages
    yield client
    store.close()


def h(api, who):
    return {"Authorization": f"Bearer {api.tokens[who]}"}


def error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"status", "code", "message"} and err["status"] == status
    return err["message"]


def job(tmp_path: Path, size: int = 200_000) -> tuple[str, bytes]:
    root = tmp_path / "job"
    root.mkdir(exist_ok=True)
    (root / "train.py").write_text("def train(ctx):\n    pass\n")
    (root / "weights.bin").write_bytes(random.Random(size).randbytes(size))  # incompressible
    p = pack(root, tmp_path)
    return p.digest, p.path.read_bytes()


def spec(package: str | None) -> dict:
    return {"name": "train", "entrypoint": "train.py:train", "workdir": ".", "package": package,
            "dataset": {"uri": "s3://data/digits"}, "workers": {"count": 1, "cpus": 1}}


def test_head_put_round_trip(api, tmp_path):
    digest, body = job(tmp_path)
    assert len(body) > 64_000
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "a")).status_code == 404
    r = api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a"))
    assert r.status_code == 201, r.text
    assert r.json() == {"digest": digest, "bytes": len(body), "created": True}
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "a")).status_code == 200
    r = api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a"))
    assert r.status_code == 200 and r.json()["created"] is False
    assert Path(api.packages.path_or_uri("a", digest)).read_bytes() == body
    assert api.head(f"/v1/packages/{digest}").status_code == 401


def test_a_wrong_or_malformed_digest_is_refused(api, tmp_path):
    digest, body = job(tmp_path)
    other = "sha256:" + "0" * 64
    assert f"not {other}" in error(api.put(f"/v1/packages/{other}", content=body, headers=h(api, "a")), 400)
    assert not api.packages.exists("a", other)
    r = api.put("/v1/packages/sha256:abc", content=body, headers=h(api, "a"))
    assert "digest: got 'sha256:abc'" in error(r, 400)
    assert api.head("/v1/packages/md5:abc", headers=h(api, "a")).status_code == 400


def test_an_oversized_body_is_refused_with_413_without_storing_it(api, tmp_path):
    digest, body = job(tmp_path, size=CAP + 4096)
    assert len(body) > CAP

    def chunked():  # no Content-Length: the cap is enforced while the body arrives
        for i in range(0, len(body), 64 << 10):
            yield body[i:i + (64 << 10)]

    msg = error(api.put(f"/v1/packages/{digest}", content=chunked(), headers=h(api, "a")), 413)
    assert "larger than 1 MiB" in msg and ".shipyardignore" in msg
    assert "larger than 1 MiB" in error(api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a")), 413)
    assert not api.packages.exists("a", digest)
    assert not list(Path(api.packages.staging_dir()).iterdir())  # no staging file left behind


def test_an_unsafe_zip_is_refused_even_with_the_right_digest(api):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../etc/cron.d/evil", "* * * * * root sh -c 'id'")
    body = buf.getvalue()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    msg = error(api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a")), 422)
    assert "'..' component" in msg
    assert "not a zip file" in error(api.put("/v1/packages/sha256:" + hashlib.sha256(b"hi").hexdigest(),
                                             content=b"hi", headers=h(api, "a")), 422)
    assert not api.packages.exists("a", digest)


def test_a_tenant_cannot_see_or_run_another_tenants_package(api, tmp_path):
    digest, body = job(tmp_path)
    assert api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a")).status_code == 201
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "b")).status_code == 404
    msg = error(api.post("/v1/jobs", json=spec(digest), headers=h(api, "b")), 422)
    assert msg == f"package: {digest} has not been uploaded by this tenant (shipyard submit uploads it)"
    r = api.post("/v1/jobs", json=spec(digest), headers=h(api, "a"))
    assert r.status_code == 201, r.text
    assert api.get(f"/v1/jobs/{r.json()['id']}", headers=h(api, "a")).json()["spec"]["package"] == digest
    # B uploads the same bytes: now B has its own copy and may run it.
    assert api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "b")).status_code == 201
    assert api.post("/v1/jobs", json=spec(digest), headers=h(api, "b")).status_code == 201
    r = api.post("/v1/jobs", json=spec("sha256:nope"), headers=h(api, "a"))
    assert "package: got 'sha256:nope'" in error(r, 422)


def test_a_backend_that_cannot_run_the_package_refuses_the_submit(tmp_path):
    from shipyard.backends.kuberay import KubeRayBackend
    from shipyard.backends.kuberay_manifest import KubeRayConfig

    store = Store.open(data_dir=tmp_path)
    packages = PackageStore(tmp_path / "packages")
    kuberay = KubeRayBackend(KubeRayConfig(image="i"), api_client=object(), packages=packages)
    api = TestClient(create_app(store, backend=kuberay, config=ApiConfig(auth=False), packages=packages))
    digest, body = job(tmp_path)
    assert api.put(f"/v1/packages/{digest}", content=body).status_code == 201
    msg = error(api.post("/v1/jobs", json=spec(digest)), 422)
    assert msg.startswith("package: the kuberay backend runs code packages from object storage only")
    assert "--package-store s3://" in msg
    store.close()


def test_an_object_store_package_store_round_trip(api, tmp_path, bucket):
    """``--package-store s3://...`` (the session's moto server): PUT through the API, then the URI
    a backend hands to Ray, per tenant."""
    packages = PackageStore(f"s3://{bucket}/packages", PackageLimits(max_bytes=CAP))
    api.app.state.packages = packages
    digest, body = job(tmp_path)
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "a")).status_code == 404
    assert api.put(f"/v1/packages/{digest}", content=body, headers=h(api, "a")).status_code == 201
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "a")).status_code == 200
    assert api.head(f"/v1/packages/{digest}", headers=h(api, "b")).status_code == 404
    uri = packages.path_or_uri("a", digest)
    assert uri == f"s3://{bucket}/packages/a/{digest.removeprefix('sha256:')}.zip"
    import boto3

    obj = boto3.client("s3", endpoint_url=os.environ["SHIPYARD_S3_ENDPOINT"]).get_object(
        Bucket=bucket, Key=uri.split("/", 3)[3])
    assert obj["Body"].read() == body
