"""Hostile input against a real `shipyard server` (uvicorn, SQLite) on the session's Ray head:
the session's shared one (conftest.shared_server), attacked by a tenant of this module's own
(not an admin), whose job list must stay empty.

Every case is refused with one JSON error (4xx) within a second; nothing is stored; the server's
memory stays flat over the whole suite; afterwards an ordinary job is admitted and runs. Then
the server's own secrets: a job that prints its whole environment shows none of them, and the
store and token files in the data dir are the server user's alone."""

from __future__ import annotations

import json
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

from conftest import SERVER_SECRET as SECRET, on_shared_server
from test_server import JOB, steps_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, shared_server, digits_shards):
    """The shared server (whose environment holds SECRET as a password and as AWS_SECRET_ACCESS_KEY),
    seen by this module's own tenant."""
    base = tmp_path_factory.mktemp("hostile")
    digits = digits_shards / "train"
    s = on_shared_server(shared_server, {}, roots=(base / "jobs",), read_only=(digits,))
    s.client = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.token}"}, timeout=10)
    s.base, s.digits = base, digits
    yield s
    s.client.close()
    s.cancel_active()


def threads(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Threads:")).split()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def billion_laughs() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join('*' + prev for _ in range(9))}]")
    return ("\n".join(lines) + "\nname: x\nentrypoint: m:f\ndataset: {uri: s3://b/x}\nconfig: {boom: *i}\n").encode()


def spec_with(**fields) -> bytes:
    body = {"name": "x", "entrypoint": "m:f", "dataset": {"uri": "s3://bucket/d"}, "checkpoint": {"uri": "s3://bucket/c"}}
    for path, value in fields.items():
        node = body
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return json.dumps(body, allow_nan=True).encode()


NUMERIC = ["workers.count", "workers.cpus", "workers.gpus", "workers.resize_interval_s", "dataset.batch_size",
           "dataset.seed", "dataset.epochs", "checkpoint.every_steps", "checkpoint.every_seconds",
           "checkpoint.keep_last", "checkpoint.preemption_grace_s", "priority", "max_failures", "stall_timeout_s"]
BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 10**30]

CASES = [
    ("alias bomb (yaml)", "POST", "/v1/jobs", billion_laughs(), "application/yaml", (422,)),
    ("recursive alias", "POST", "/v1/jobs", b"a: &a [*a]\n", "application/yaml", (422,)),
    ("deep json", "POST", "/v1/jobs", b"[" * 200_000 + b"]" * 200_000, "application/json", (400, 413, 422)),
    ("deep json, small", "POST", "/v1/jobs", b'{"a":' * 40 + b"1" + b"}" * 40, "application/json", (422,)),
    ("deep yaml", "POST", "/v1/jobs", b"- " * 5000 + b"x", "application/yaml", (400, 422)),
    ("long string", "POST", "/v1/jobs", spec_with(**{"config.s": "x" * 70_000}), "application/json", (422,)),
    ("long name", "POST", "/v1/jobs", spec_with(name="a" * 5000), "application/json", (422,)),
    ("NUL in a value", "POST", "/v1/jobs", spec_with(name="ab\x00c"), "application/json", (422,)),
    ("NUL in a key", "POST", "/v1/jobs", spec_with(**{"config.k\x00": 1}), "application/json", (422,)),
    ("reserved env", "POST", "/v1/jobs", spec_with(**{"env.SHIPYARD_REPORT_TOKEN": "x"}), "application/json", (422,)),
    ("bad env name", "POST", "/v1/jobs", spec_with(**{"env.A B": "x"}), "application/json", (422,)),
    ("huge memory", "POST", "/v1/jobs", spec_with(**{"workers.memory": "9" * 30 + "Ti"}), "application/json", (422,)),
    ("not a mapping", "POST", "/v1/jobs", b"[1, 2]", "application/json", (422,)),
    ("yaml python tag", "POST", "/v1/jobs", b"!!python/object/apply:os.system ['id']", "application/yaml", (400,)),
    ("yaml binary", "POST", "/v1/jobs", b"name: !!binary aGVsbG8=\nentrypoint: m:f\ndataset: {uri: s3://b/d}\n",
     "application/yaml", (422,)),
    ("yaml date", "POST", "/v1/jobs", b"name: x\nentrypoint: m:f\ndataset: {uri: s3://b/d}\nconfig: {d: 2001-12-14}\n",
     "application/yaml", (422,)),
    ("not utf-8", "POST", "/v1/jobs", b"\xff\xfe{", "application/json", (400,)),
    ("wrong media type", "POST", "/v1/jobs", b"x", "text/plain", (415,)),
    ("cursor", "GET", "/v1/jobs?cursor=abc", None, None, (400,)),
    ("cursor, long", "GET", "/v1/jobs?cursor=" + "9" * 500, None, None, (422,)),
    ("limit 0", "GET", "/v1/jobs?limit=0", None, None, (422,)),
    ("limit huge", "GET", "/v1/jobs?limit=" + "9" * 40, None, None, (422,)),
    ("state", "GET", "/v1/jobs?state=bogus", None, None, (400,)),
    ("states, many", "GET", "/v1/jobs?state=" + ",".join(["QUEUED"] * 100), None, None, (400,)),
    ("since_step negative", "GET", "/v1/jobs/job-x/metrics?since_step=-1", None, None, (422,)),
    ("since_step huge", "GET", "/v1/jobs/job-x/metrics?since_step=" + "9" * 40, None, None, (422,)),
    ("tail", "GET", "/v1/jobs/job-x/logs?tail=abc", None, None, (422,)),
    ("follow", "GET", "/v1/jobs/job-x/logs?follow=maybe", None, None, (422,)),
] + [(f"{f} = {v}", "POST", "/v1/jobs", spec_with(**{f: v}), "application/json", (422,))
     for f in NUMERIC for v in BAD_NUMBERS]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_bounded_time_with_one_json_error(hostile, case):
    _, method, path, body, ctype, statuses = case
    headers = {"Content-Type": ctype} if ctype else {}
    t0 = time.perf_counter()
    r = hostile.client.request(method, path, content=body, headers=headers)
    took = time.perf_counter() - t0
    assert r.status_code in statuses, r.text[:500]
    err = r.json()["error"]
    assert err["status"] == r.status_code and "Traceback" not in err["message"] and "\n" not in err["message"]
    assert took < 1.0, f"{case[0]}: {took:.2f} s"


def chunked(total: int, piece: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b" " * piece
        sent += piece


@pytest.mark.parametrize("with_token", [True, False])
def test_a_chunked_body_over_the_limit_is_refused_without_being_parsed(hostile, with_token):
    headers = {"Content-Type": "application/json"}
    if not with_token:
        headers["Authorization"] = ""
    t0 = time.perf_counter()
    r = hostile.client.post("/v1/jobs", content=chunked(8 << 20), headers=headers)
    assert r.status_code == (413 if with_token else 401), r.text[:300]
    assert time.perf_counter() - t0 < 2.0
    if with_token:
        assert "larger than 1048576 bytes" in r.json()["error"]["message"]


def test_a_raw_http_body_without_length_or_token_is_answered_401_before_it_is_read(hostile):
    """A client that never finishes its body: without a token it is told 401 at once."""
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"{" * 1000)
        assert s.recv(200).startswith(b"HTTP/1.1 401")


def test_after_the_hostile_suite_memory_is_flat_nothing_was_stored_and_a_real_job_runs(hostile):
    before = rss_mb(hostile.proc.pid)
    for case in CASES * 2:
        _, method, path, body, ctype, _ = case
        hostile.client.request(method, path, content=body, headers={"Content-Type": ctype} if ctype else {})
    grown = rss_mb(hostile.proc.pid) - before
    assert grown < 100, f"server RSS grew {grown:.0f} MB"
    assert hostile.client.get("/v1/jobs").json()["items"] == []

    out = hostile.base / "jobs" / "ok"
    out.mkdir(parents=True)
    from shipyard.client import Client

    client = Client(hostile.url, hostile.token)
    spec = Path(JOB).parent / "job.yaml"
    job_id = client.submit(str(spec), overrides=[f"dataset.uri={hostile.digits}", f"checkpoint.uri={out / 'ck'}",
                                                 f"config.out={out}", "config.print_env=true", "dataset.epochs=1",
                                                 "config.step_sleep_s=0.5"])
    deadline = time.monotonic() + 120
    while client.get(job_id)["state"] not in ("RUNNING", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, client.get(job_id)
        time.sleep(0.3)
    # 50 followed log streams, each dropped by its client after the first bytes: the server's
    # threads are back to where they were within 10 s (nothing waits for a chunk nobody reads).
    baseline = threads(hostile.proc.pid)
    for _ in range(50):
        with hostile.client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as r:
            assert r.status_code == 200
            next(r.iter_bytes(), b"")
    deadline = time.monotonic() + 10
    while threads(hostile.proc.pid) > baseline + 2:
        assert time.monotonic() < deadline, f"{threads(hostile.proc.pid)} threads, {baseline} before the streams"
        time.sleep(0.5)
    job = client.wait(job_id, timeout=240, poll_s=0.5)
    assert job["state"] == "SUCCEEDED", json.dumps(job)[:3000]
    assert steps_run(out) == list(range(1, 24))
    logs = client.logs(job_id, tail=None)
    assert "environment: " in logs and "SHIPYARD_REPORT_URL=" in logs  # the job did print its environment
    for leak in (SECRET, "SHIPYARD_ADMIN_PASSWORD_OF_THE_SERVER", hostile.token, hostile.server.token):
        assert leak not in logs, f"{leak} reached the job"


def test_the_servers_files_are_its_users_alone(hostile):
    data = hostile.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_server_refuses_to_put_two_tenants_on_one_ray_cluster_without_the_trust_flag(tmp_path, ray_address):
    import subprocess

    from conftest import EXE
    from shipyard.store import Store

    data = tmp_path / "server"
    data.mkdir()
    with Store.open(None, data_dir=data) as store:
        store.create_tenant("team-a")
    r = subprocess.run([EXE, "server", "--data-dir", str(data), "--ray-address", ray_address, "--port", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--shared-ray-trust" in lines[0] and "Traceback" not in r.stderr, r.stderr
