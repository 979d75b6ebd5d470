"""The submitter's code reaches the job from the submitter: a real `shipyard server` on the
session's Ray head (the session's shared one, as a tenant of the test's own), a job directory
submitted with the real CLI and deleted as soon as `submit` returns (the job still succeeds, from
the uploaded package), an unchanged directory that is not uploaded again, and an oversized one
refused on the client. One job run."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest

from conftest import REPO, on_shared_server
from test_server import cli

pytestmark = pytest.mark.integration
SOURCE = REPO / "tests" / "integration" / "jobs" / "record_ids"


def requests(server, method: str) -> float:
    """Answered requests to /v1/packages/{digest} by method since the test began (the server is
    shared: its /metrics count every earlier test's too), from the server's /metrics."""
    return answered(server, method) - server.seen[method]


def answered(server, method: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = rf'shipyard_http_requests_total{{method="{method}",route="[^"]*/packages/{{digest}}"[^}}]*}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


@pytest.fixture
def server(shared_server, tmp_path, cli_env, digits_shards):
    tenant = on_shared_server(shared_server, cli_env, roots=(tmp_path,), read_only=(digits_shards,))
    tenant.seen = {m: answered(tenant, m) for m in ("HEAD", "PUT")}
    yield tenant
    tenant.cancel_active()


def test_the_uploaded_package_runs_after_the_directory_is_deleted(server, digits_shards, tmp_path):
    from shipyard.client import Client

    job_dir = tmp_path / "job"
    shutil.copytree(SOURCE, job_dir)
    (job_dir / "scratch").mkdir()
    (job_dir / "scratch" / "big.bin").write_bytes(b"\0" * (3 << 20))
    (job_dir / ".shipyardignore").write_text("scratch/\n")
    again = tmp_path / "again"
    shutil.copytree(job_dir, again)
    out = tmp_path / "out"
    out.mkdir()
    r = cli(server, "submit", "-f", str(job_dir / "job.yaml"), "--set", f"dataset.uri={digits_shards / 'train'}",
            "--set", f"checkpoint.uri={tmp_path / 'ck'}", "--set", f"config.out={out}", "--set", "dataset.epochs=1",
            "--set", "workers.count=1")
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(job_dir)  # the server has the code now; the submitter's copy is not needed
    job_id = r.stdout.strip()
    assert re.fullmatch(r"\S+", job_id), r.stdout
    assert re.search(r"uploading 0\.0 MiB code package sha256:[0-9a-f]{12}… \(\d+ files from ", r.stderr), r.stderr
    assert (requests(server, "HEAD"), requests(server, "PUT")) == (1, 1)

    client = Client(server.url, server.token)
    job = client.get(job_id)
    assert job["spec"]["workdir"] == "." and job["spec"]["package"].startswith("sha256:")
    # The same content from another directory: the server has it, so nothing is uploaded.
    assert client.upload(again, on_upload=lambda p: pytest.fail(f"uploaded again: {p}")) == job["spec"]["package"]
    assert (requests(server, "HEAD"), requests(server, "PUT")) == (2, 1)

    # Too large for the client's cap: refused before anything is sent, naming the largest file.
    (again / "data.bin").write_bytes(b"\0" * (2 << 20))
    r = cli(server, "submit", "-f", str(again / "job.yaml"), "--max-package-mb", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "over the 1.0 MiB limit" in r.stderr and "largest: data.bin (2.0 MiB)" in r.stderr, r.stderr
    assert requests(server, "PUT") == 1

    job = client.wait(job_id, timeout=240, poll_s=0.5)
    assert job["state"] == "SUCCEEDED", str(job)[:3000]
    assert (out / "rank0.jsonl").exists()
