"""Ctrl-C in `shipyard run` (issue 19): the first SIGINT makes the workers checkpoint at their
next step, the run exits 130 once that checkpoint is committed, and running the job again
resumes from it; a second SIGINT exits at once.

The first test is a terminal's Ctrl-C as it really arrives: SIGINT to the whole process group
of a `shipyard run` that started its own Ray (whose dashboard, in that group, exits on it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration
JOB = str(REPO / "tests" / "integration" / "jobs" / "record_ids" / "job.yaml")
EXE = str(Path(sys.executable).parent / "shipyard")


def start(cli_env, digits_shards, out: Path, *, ray_address: str | None = None) -> subprocess.Popen:
    env = dict(cli_env)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    cmd = [EXE, "run", JOB, "--set", f"dataset.uri={digits_shards / 'train'}", "--set", f"checkpoint.uri={out / 'ck'}",
           "--set", f"config.out={out}", "--set", "config.step_sleep_s=0.3", "--set", "checkpoint.every_steps=100"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = out / "rank0.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout}s: {proc.communicate()[0][-3000:]}")


def test_ctrl_c_checkpoints_at_the_next_step_exits_130_and_the_rerun_resumes(cli_env, digits_shards, ray_address,
                                                                             tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start(cli_env, digits_shards, out)  # its own Ray: in the process group, as under a terminal
    wait_for_step(out, 5, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, stdout[-3000:]
    assert "interrupted (SIGINT): the workers checkpoint at their next step" in stdout, stdout[-3000:]
    assert "Error in training function" not in stdout and "Traceback" not in stdout, stdout[-3000:]
    said = re.search(r"interrupted at step (\d+): checkpoint committed \((\S+)\)", stdout)
    assert said, stdout[-3000:]
    step = int(said.group(1))
    assert step >= 5 and said.group(2) == str(out / "ck" / f"step-{step:09d}")
    assert (out / "ck" / f"step-{step:09d}" / "COMMIT.json").exists()

    rerun = subprocess.run([EXE, "run", JOB, "--set", f"dataset.uri={digits_shards / 'train'}",
                            "--set", f"checkpoint.uri={out / 'ck'}", "--set", f"config.out={out}",
                            "--set", "dataset.epochs=1"],
                           env={**cli_env, "RAY_ADDRESS": ray_address}, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"restored from checkpoint at step {step} " in rerun.stdout, rerun.stdout[-3000:]


def test_a_second_ctrl_c_exits_at_once(cli_env, digits_shards, ray_address, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start(cli_env, digits_shards, out, ray_address=ray_address)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    stdout = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, stdout[-3000:]
    assert time.monotonic() - t0 < 15, "the second Ctrl-C did not exit at once"
    assert "interrupted again: exiting without waiting for the checkpoint" in stdout, stdout[-3000:]
