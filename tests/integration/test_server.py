"""The job service end to end: a real `shipyard server` (uvicorn, SQLite) in a subprocess on the
session's Ray head, jobs submitted with the real CLI, and the server `kill -9`-ed mid-run.

The server is the session's shared one (conftest.shared_server); each test is a tenant of its
own on it. The test that kills it starts it again, on the same data dir and port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXE, REPO, Server, on_shared_server  # noqa: F401 - Server: test_server_lifecycle imports it from here

pytestmark = pytest.mark.integration
JOB = str(REPO / "tests" / "integration" / "jobs" / "record_ids" / "job.yaml")


@pytest.fixture
def digits(digits_shards):
    """scikit-learn's digits training split in shards of 300 rows (the session's, sharded once)."""
    return digits_shards / "train"


@pytest.fixture
def server(shared_server, tmp_path, cli_env, digits):
    """The session's shared server, as a tenant of this test's own (see conftest.Tenant); a job
    the test leaves running is cancelled after it."""
    tenant = on_shared_server(shared_server, cli_env, roots=(tmp_path,), read_only=(digits,))
    yield tenant
    tenant.cancel_active()


def cli(server, *args, timeout=120):
    env = {**server.env, "SHIPYARD_URL": server.url, "SHIPYARD_TOKEN": server.token}
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(server, digits, out: Path, *extra):
    out.mkdir()
    r = cli(server, "submit", "-f", JOB, "--set", f"dataset.uri={digits}", "--set", f"checkpoint.uri={out / 'ck'}",
            "--set", f"config.out={out}", "--set", "dataset.epochs=1", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def wait(client, job_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} still {job['state']}: {json.dumps(job)[:3000]}")


def forget_on_the_head(server, submission: str) -> None:
    """Delete a finished Ray job (and its logs) from the head, as `ray job delete` does."""
    code = ("import os, sys; from shipyard.config import enable_ray_token_auth; enable_ray_token_auth(); "
            "from shipyard.backends.ray import RayBackend; "
            "assert RayBackend(os.environ['RAY_ADDRESS']).client.delete_job(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, submission], env={**server.env, "RAY_ADDRESS": server.ray_address},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def steps_run(out: Path, rank: int = 0) -> list[int]:
    return [json.loads(line)["step"] for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def wait_for_steps(out: Path, n: int, timeout: float = 120, also=lambda: True) -> None:
    """Until rank 0 of the job writing to ``out`` has run ``n`` steps (and ``also()`` holds)."""
    deadline = time.monotonic() + timeout
    while not (out / "rank0.jsonl").exists() or len(steps_run(out)) < n or not also():
        assert time.monotonic() < deadline, f"training did not reach step {n} in {timeout:.0f} s"
        time.sleep(0.3)


def test_two_jobs_submitted_with_the_cli_both_succeed_with_attempts_and_metrics(server, digits, tmp_path):
    from shipyard.client import Client

    a = submit(server, digits, tmp_path / "a")
    b = submit(server, digits, tmp_path / "b")
    client = Client(server.url, server.token)
    for job_id, out in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        job = client.wait(job_id, timeout=240, poll_s=0.5)
        assert job["state"] == "SUCCEEDED", json.dumps(job)[:3000]
        assert (job["step"], job["total_steps"]) == (23, 23)
        assert [(x["number"], x["kind"]) for x in job["attempts"]] == [(1, "finished")]
        assert job["checkpoint"].endswith("step-000000023")
        assert [c["step"] for c in job["checkpoints"] if c["committed"]][-1] == 23
        assert "loss" in job["metrics"] and client.metrics(job_id, ["loss"])
        # Measured by the platform (the job reports only its loss), sent with the driver's reports.
        assert {"step_time_s", "data_wait_s", "samples_per_s"} <= set(job["metrics"]), job["metrics"]
        assert job["metrics"]["samples_per_s"] > 0 and client.metrics(job_id, ["step_time_s"])
        assert steps_run(out) == list(range(1, 24))
    r = cli(server, "status", a)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout and "finished" in r.stdout, r.stdout + r.stderr
    r = cli(server, "list", "--state", "SUCCEEDED")
    assert a in r.stdout and b in r.stdout
    assert "record-ids finished: step 23/23" in cli(server, "logs", a).stdout
    # The server keeps its own copy of every run's log: it outlives the run's record on the Ray head.
    forget_on_the_head(server, f"shipyard-{a}-1")
    assert "record-ids finished: step 23/23" in cli(server, "logs", a).stdout
    import shutil

    shutil.rmtree(server.data_dir / "logs" / a)  # and once both copies are gone, the user is told so
    r = cli(server, "logs", a)
    assert r.returncode == 2 and "logs of job" in r.stderr and "are gone" in r.stderr, r.stdout + r.stderr
    # Bad input through the CLI: the field is named, exit 2, no traceback.
    r = cli(server, "submit", "-f", JOB, "--set", "workers.count=0")
    assert r.returncode == 2 and "workers.count: got 0" in r.stderr and "Traceback" not in r.stderr
    r = cli(server, "cancel", a)
    assert r.returncode == 2 and "is SUCCEEDED and cannot become CANCELLED" in r.stderr
    r = cli(server, "status", "job-nope")
    assert r.returncode == 2 and "no job 'job-nope'" in r.stderr


def test_server_killed_mid_run_reattaches_and_the_job_succeeds_exactly_once(server, digits, tmp_path, ray_address):
    from shipyard.client import Client

    out = tmp_path / "r"
    job_id = submit(server, digits, out, "--set", "dataset.epochs=3")
    client = Client(server.url, server.token)
    wait(client, job_id, ("RUNNING",), timeout=120)
    server.kill9()
    ran = len(steps_run(out)) if (out / "rank0.jsonl").exists() else 0
    wait_for_steps(out, ran + 1)  # the run goes on without its server
    server.start()  # same data dir: same store and report key
    client = Client(server.url, server.token)
    job = client.wait(job_id, timeout=240, poll_s=0.5)
    assert job["state"] == "SUCCEEDED", json.dumps(job)[:3000]
    assert [(x["number"], x["kind"]) for x in job["attempts"]] == [(1, "finished")]
    assert steps_run(out) == list(range(1, 70))  # one run: every step once, none twice
    states = [e["message"].split(":")[0] for e in job["events"] if e["kind"] == "state"]
    assert states == ["QUEUED -> ADMITTED", "ADMITTED -> RUNNING", "RUNNING -> SUCCEEDED"], states
    assert job["backend_handle"] == f"shipyard-{job_id}-1"  # submitted once, never again


def test_cancelling_a_running_job_makes_its_workers_checkpoint_before_the_run_stops(server, digits, tmp_path):
    """The preemption path: the backend stops the run with SIGTERM to the driver, which forwards
    it to the training workers; they commit a checkpoint at one step, then the driver exits."""
    from shipyard.client import Client

    out = tmp_path / "c"
    job_id = submit(server, digits, out, "--set", "dataset.epochs=40", "--set", "checkpoint.every_steps=1000")
    client = Client(server.url, server.token)
    wait(client, job_id, ("RUNNING",), timeout=120)
    wait_for_steps(out, 5)
    assert client.cancel(job_id)["state"] == "CANCELLED"
    deadline = time.monotonic() + 90
    while "checkpoint committed" not in (text := client.logs(job_id)) or "exiting" not in text:
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.3)
    assert "stop: SIGTERM sent to 2 worker processes" in text
    from shipyard.checkpoint import CheckpointStore

    latest = CheckpointStore(str(out / "ck")).latest()
    assert latest is not None and latest.step >= 5  # saved on SIGTERM: every_steps=1000 was never reached
    assert latest.step in steps_run(out)


def test_a_higher_priority_job_preempts_a_running_one_which_resumes_from_its_checkpoint_afterwards(
        server, digits, tmp_path):
    """Preempt -> requeue -> resume with the real scheduler on the session's Ray head (4 CPUs).

    The low job (priority 0) takes all 4 CPUs; the high one (priority 10) needs 2. The loop
    preempts the low one (its driver SIGTERMs the workers, which checkpoint at the step they are
    at), requeues it, runs the high one, then re-admits the low one, which resumes from that
    checkpoint: every step runs exactly once across its two runs.

    The preemption must land mid-run: the high job is submitted only once the low one has
    reported an attempt (before that it is STARTING and the loop holds off preempting it, for as
    long as the driver's next report takes), and the low job's steps are slowed so that its 230
    (23 s at least) cannot all run before the stop reaches them (it takes a few seconds)."""
    from shipyard.client import Client

    client = Client(server.url, server.token)
    low_out, high_out = tmp_path / "low", tmp_path / "high"
    # every_steps=1000 is never reached: the only checkpoints are the preemption's and the final one.
    low = submit(server, digits, low_out, "--set", "dataset.epochs=10", "--set", "workers.cpus=2",
                 "--set", "checkpoint.every_steps=1000", "--set", "name=low", "--set", "config.step_sleep_s=0.1")
    wait_for_steps(low_out, 5, timeout=180, also=lambda: bool(client.get(low)["attempts"]))
    high = submit(server, digits, high_out, "--set", "priority=10", "--set", "name=high")
    asked_at = len(steps_run(low_out))

    done = wait(client, high, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=150)
    assert done["state"] == "SUCCEEDED", json.dumps(done)[:3000]
    assert [(a["number"], a["kind"]) for a in done["attempts"]] == [(1, "finished")]
    assert steps_run(high_out) == list(range(1, 24))

    job = wait(client, low, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=150)
    assert job["state"] == "SUCCEEDED", json.dumps(job)[:3000]
    states = [e["message"].split(":")[0] for e in job["events"] if e["kind"] == "state"]
    total, ran = job["total_steps"], steps_run(low_out)
    assert "PREEMPTED -> SUCCEEDED (finished)" not in states, (
        f"the low job trained all {total} steps (at least {total * 0.1:.0f} s) before the preemption asked for at "
        f"step {asked_at} stopped it: the preemption took that long to land. states={states}")
    assert states == ["QUEUED -> ADMITTED", "ADMITTED -> RUNNING", "RUNNING -> PREEMPTED (preempted)",
                      "PREEMPTED -> QUEUED (preempted)", "QUEUED -> ADMITTED", "ADMITTED -> RUNNING",
                      "RUNNING -> SUCCEEDED"], states
    first, second = job["attempts"]
    assert (first["kind"], first["run"], second["kind"], second["run"]) == (
        "preempted", f"shipyard-{low}-1", "finished", f"shipyard-{low}-2"), job["attempts"]
    # The workers checkpointed on the preemption notice; the second run resumed from there.
    assert first["committed_step"] and second["start_step"] == first["committed_step"] > 0, job["attempts"]
    assert not first["steps_lost"]
    assert ran == list(range(1, total + 1))  # no step twice, none lost
    committed = [c["step"] for c in job["checkpoints"] if c["committed"]]
    assert committed == [first["committed_step"], total], committed
    # The high job started once the low one had stopped; the low one came back only once the
    # high one's workers were done (its driver may still be saying goodbye: that holds no CPU).
    state_at = [(e["message"].split(":")[0], e["at"]) for e in job["events"] if e["kind"] == "state"]
    requeued = next(t for m, t in state_at if m.startswith("PREEMPTED -> QUEUED"))
    readmitted = [t for m, t in state_at if m == "QUEUED -> ADMITTED"][-1]
    assert requeued <= done["started_at"] and done["attempts"][-1]["ended_at"] <= readmitted, (state_at, done)
