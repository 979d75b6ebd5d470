"""``Client.submit`` over a fake transport: the job directory is packed and uploaded only when the
server lacks it, the spec names the package, and a POST retried after a transport error carries
the same Idempotency-Key."""

from __future__ import annotations

import json

import httpx
import pytest

from shipyard import client as client_module
from shipyard.client import Client, Unreachable


@pytest.fixture
def job(tmp_path):
    root = tmp_path / "job"
    root.mkdir()
    (root / "train.py").write_text("def train(ctx):\n    pass\n")
    (root / "job.yaml").write_text("name: t\nentrypoint: train.py:train\ndataset: {uri: s3://b/d}\n")
    return root


def fake(monkeypatch, have: set[str], fail_posts: int = 0):
    calls: list[httpx.Request] = []
    state = {"fails": fail_posts}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        path = request.url.path
        if request.method == "HEAD":
            return httpx.Response(200 if path.rsplit("/", 1)[1] in have else 404)
        if request.method == "PUT":
            have.add(path.rsplit("/", 1)[1])
            request.read()
            return httpx.Response(201, json={"digest": path.rsplit("/", 1)[1], "bytes": 1, "created": True})
        if state["fails"]:
            state["fails"] -= 1
            raise httpx.ConnectError("connection reset by peer", request=request)
        return httpx.Response(201, json={"id": "job-1", "state": "QUEUED"})

    monkeypatch.setattr(client_module, "RETRY_BACKOFF_S", (0.0,))
    c = Client("http://server", "tok")
    c._http = httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))
    return c, calls


def test_a_directory_is_uploaded_once_and_the_spec_names_its_package(monkeypatch, job):
    have: set[str] = set()
    c, calls = fake(monkeypatch, have)
    announced = []
    assert c.submit(job / "job.yaml", on_upload=lambda p: announced.append(p)) == "job-1"
    assert [r.method for r in calls] == ["HEAD", "PUT", "POST"]
    body = json.loads(calls[-1].content)
    digest = calls[0].url.path.rsplit("/", 1)[1]
    assert body["workdir"] == "." and body["package"] == digest == announced[0].digest
    assert calls[1].headers["content-length"] == str(announced[0].bytes)  # streamed, not chunked
    calls.clear()
    c.submit(job / "job.yaml", on_upload=lambda p: pytest.fail("uploaded twice"))
    assert [r.method for r in calls] == ["HEAD", "POST"]


def test_a_post_retried_after_a_transport_error_keeps_its_idempotency_key(monkeypatch, job):
    c, calls = fake(monkeypatch, set(), fail_posts=2)
    assert c.submit(job / "job.yaml") == "job-1"
    posts = [r for r in calls if r.method == "POST"]
    assert len(posts) == 3 and len({r.headers["idempotency-key"] for r in posts}) == 1
    first = posts[0].headers["idempotency-key"]
    calls.clear()
    c.submit(job / "job.yaml")
    assert [r.headers["idempotency-key"] for r in calls if r.method == "POST"] != [first]  # one key per submit


def test_the_post_gives_up_after_three_retries(monkeypatch, job):
    c, calls = fake(monkeypatch, set(), fail_posts=10)
    with pytest.raises(Unreachable, match="cannot reach the shipyard server"):
        c.submit(job / "job.yaml")
    assert sum(r.method == "POST" for r in calls) == 4
