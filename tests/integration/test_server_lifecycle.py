"""`shipyard server`'s lifecycle with real subprocesses on the session's Ray head: SIGTERM ends it
within seconds while a job runs (a followed log stream included) and the job survives the
restart; replicas on one store run exactly one scheduler, and a standby takes over when the
leader is killed; `shipyard server stop-head` stops only a recorded head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_server import EXE, Server, digits, steps_run, submit, wait, wait_for_steps  # noqa: F401 - digits is a fixture

pytestmark = pytest.mark.integration
NOTE = "[shipyard: the server is shutting down; this log stream ends here]"


def test_sigterm_exits_within_seconds_and_the_running_job_finishes_once_after_the_restart(
        tmp_path, ray_address, cli_env, digits):
    from shipyard.client import Client

    server = Server(tmp_path / "server", ray_address, cli_env, roots=(tmp_path,), read_only=(digits,)).start()
    out = tmp_path / "job"
    job_id = submit(server, digits, out, "--set", "dataset.epochs=3", "--set", "config.step_sleep_s=0.2")
    client = Client(server.url, server.token)
    wait(client, job_id, ("RUNNING",), timeout=120)
    wait_for_steps(out, 3)

    followed: list[str] = []
    receiving = threading.Event()

    def follow():  # a `shipyard logs -f` held open across the shutdown
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/logs", params={"follow": "true"},
                          headers={"Authorization": f"Bearer {server.token}"}, timeout=60) as r:
            for chunk in r.iter_text():
                followed.append(chunk)
                receiving.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    # Ray's log websocket answers its first chunk in ~1-3 s (more under load): the shutdown must
    # end a stream that is carrying the job's output, not one still being opened.
    assert receiving.wait(60), "nothing of the job's log reached the follower in 60 s"
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(30)
    took = time.monotonic() - t0
    log = server.logs.read_text()
    assert rc == 0, log[-3000:]
    assert took < 12, f"SIGTERM -> exit took {took:.1f}s\n{log[-3000:]}"
    reader.join(5)
    assert not reader.is_alive() and "".join(followed).rstrip().endswith(NOTE), "".join(followed)[-500:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]

    server.start()  # same data dir: same store and report key
    job = Client(server.url, server.token).wait(job_id, timeout=240, poll_s=0.5)
    assert job["state"] == "SUCCEEDED", json.dumps(job)[:3000]
    assert [(x["number"], x["kind"]) for x in job["attempts"]] == [(1, "finished")]
    assert steps_run(out) == list(range(1, 70))  # one run: every step once, none twice
    assert job["backend_handle"] == f"shipyard-{job_id}-1"
    assert [(r["number"], r["attempts"], r["outcome"]) for r in job["runs"]] == [(1, [1], "finished")]
    before = "".join(followed)
    logs = Client(server.url, server.token).logs(job_id, tail=None)  # the head kept the run: its whole log
    assert before.strip() and before.strip().splitlines()[0] in logs, (before[:500], logs[:500])
    assert server.stop() == 0, server.logs.read_text()[-3000:]


def scheduler_roles(servers: list[Server]) -> list[str | None]:
    roles = []
    for s in servers:
        try:
            roles.append(httpx.get(s.url + "/healthz", timeout=5).json().get("scheduler"))
        except httpx.HTTPError:
            roles.append(None)
    return roles


def test_two_replicas_on_one_store_run_one_scheduler_and_the_standby_takes_over(
        fresh_database_url, tmp_path, ray_address, cli_env):
    """On PostgreSQL (advisory lock) and on one SQLite file (flock): one leader; kill -9 it and
    the other leads within 10 s."""
    args = ("--database-url", fresh_database_url)
    servers = [Server(tmp_path / f"server-{i}", ray_address, cli_env, args=args).start() for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while sorted(map(str, roles := scheduler_roles(servers))) != ["leader", "standby"]:
            assert time.monotonic() < deadline, roles
            time.sleep(0.3)
        lead, standby = (servers[0], servers[1]) if roles[0] == "leader" else (servers[1], servers[0])
        assert "this server serves the API and stands by" in standby.logs.read_text()
        time.sleep(1)
        assert scheduler_roles(servers) == roles  # the standby keeps standing by
        lead.kill9()
        t0 = time.monotonic()
        while scheduler_roles([standby]) != ["leader"]:
            assert time.monotonic() - t0 < 10, standby.logs.read_text()[-3000:]
            time.sleep(0.2)
        assert "scheduler lock taken" in standby.logs.read_text()
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.kill9()


HEAD = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(600)
"""


def test_stop_head_stops_the_recorded_head_only(tmp_path, cli_env):
    """A stand-in head (a process whose argv reads `ray start --head`, listening like a GCS):
    `stop-head` stops it and forgets it; a recorded pid that is not a Ray head is left alone."""
    data = tmp_path / "server"
    data.mkdir()
    fake = subprocess.Popen([sys.executable, "-c", HEAD, "start", "--head"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", HEAD], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port, other_port = int(fake.stdout.readline()), int(other.stdout.readline())
        record = data / "ray-head.json"
        record.write_text(json.dumps({"pid": other.pid, "address": f"127.0.0.1:{other_port}"}))
        r = subprocess.run([EXE, "server", "stop-head", "--data-dir", str(data)], env=cli_env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "no local Ray head is running" in r.stdout, r.stdout + r.stderr
        assert other.poll() is None and not record.exists()

        record.write_text(json.dumps({"pid": fake.pid, "address": f"127.0.0.1:{port}"}))
        r = subprocess.run([EXE, "server", "stop-head", "--data-dir", str(data)], env=cli_env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and f"stopped the local Ray head at 127.0.0.1:{port} (pid {fake.pid})" in r.stdout, \
            r.stdout + r.stderr
        assert fake.wait(5) == -signal.SIGTERM and not record.exists()
    finally:
        for p in (fake, other):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
