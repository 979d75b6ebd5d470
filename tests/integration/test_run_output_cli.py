"""`shipyard run`'s output, piped (not a terminal), on a real Ray: each line a rank prints appears
once, as ``[rank N] line``; no escape codes, no SIGTERM line at the finish, none of Ray's own
lines, no line folded at 80 columns; ``--ranks 0`` shows rank 0's lines only; a failed rank's
traceback appears once.

The job (jobs/print_ranks) runs 23 steps on 2 ranks; each rank prints a known line every 5 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration
JOB = str(Path(__file__).parent / "jobs" / "print_ranks" / "job.yaml")
STEPS = 23  # 1,438 rows / 2 ranks / 32 per batch, one epoch
LONG = "a long line that a terminal of 80 columns would fold: " + "x" * 120
RAY_WORDS = ("TrainController", "raylet", "RayTrainWorker", "SIGTERM", "Started a local Ray instance",
             "repeated", "across cluster")


def run(cli_env, tmp_path, digits_shards, *extra, ray_address: str | None = None) -> subprocess.CompletedProcess:
    """`python -m shipyard.cli run` with stdout piped, as a script or a CI log would run it: no
    NO_COLOR, no COLUMNS (so colour and width are rich's and Ray's own choices off a terminal)."""
    env = {k: v for k, v in cli_env.items() if k not in ("NO_COLOR", "COLUMNS", "FORCE_COLOR")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    cmd = [sys.executable, "-m", "shipyard.cli", "run", JOB, "--set", f"dataset.uri={digits_shards / 'train'}",
           "--set", f"checkpoint.uri={out / 'ck'}", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def lines(r: subprocess.CompletedProcess) -> list[str]:
    return (r.stdout + r.stderr).splitlines()


def assert_clean(r: subprocess.CompletedProcess) -> None:
    text = r.stdout + r.stderr
    assert "\x1b" not in text, [line for line in lines(r) if "\x1b" in line]
    for word in RAY_WORDS:
        assert word not in text, [line for line in lines(r) if word in line]


def test_each_rank_line_once_prefixed_plain_and_unfolded(cli_env, tmp_path, digits_shards):
    # A private local Ray, as `shipyard run` starts it for a user (no RAY_ADDRESS).
    r = run(cli_env, tmp_path, digits_shards)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    got = lines(r)
    assert_clean(r)
    for rank in (0, 1):
        for step in range(5, STEPS + 1, 5):
            assert got.count(f"[rank {rank}] hello from rank {rank} at step {step}") == 1, (rank, step)
        # stdout, stderr, a coloured line (its codes removed), a log record: each once, prefixed
        for line in (f"to stderr from rank {rank}", f"coloured from rank {rank}", f"a warning from rank {rank}",
                     f"{LONG} rank {rank}"):
            assert got.count(f"[rank {rank}] {line}") == 1, (rank, line)
    assert sum("hello from rank" in line for line in got) == 2 * (STEPS // 5)  # none unprefixed or twice
    summary = [line for line in got if "print-ranks finished" in line]
    assert len(summary) == 1 and summary[0].endswith("1 attempt"), summary  # one line, not folded
    assert sum("samples/s" in line or "samples_per_s" in line for line in got if "finished" in line
               or "metrics:" in line) == 1  # one throughput figure in the summary


def test_ranks_0_shows_rank_0_only(cli_env, tmp_path, digits_shards, ray_address):
    r = run(cli_env, tmp_path, digits_shards, "--ranks", "0", ray_address=ray_address)
    assert r.returncode == 0, r.stdout + r.stderr
    got = lines(r)
    assert_clean(r)
    assert not [line for line in got if line.startswith("[rank 1]") or "from rank 1" in line]
    for step in range(5, STEPS + 1, 5):
        assert got.count(f"[rank 0] hello from rank 0 at step {step}") == 1, step


def test_a_failed_ranks_traceback_is_shown_once(cli_env, tmp_path, digits_shards, ray_address):
    r = run(cli_env, tmp_path, digits_shards, "--set", "config.fail_at=3", ray_address=ray_address)
    assert r.returncode == 1, r.stdout + r.stderr
    print(r.stdout)
    text = r.stdout + r.stderr
    assert text.count("Traceback (most recent call last)") == 1, text
    assert lines(r).count("[rank 0] Traceback (most recent call last):") == 1
    assert lines(r).count("[rank 0] RuntimeError: injected failure at step 3") == 1
    assert "✗ print-ranks failed" in r.stdout and "injected failure at step 3" in r.stdout.split("✗")[-1]
    assert_clean(r)


@pytest.fixture
def cli_env(cli_env):
    """The shared CLI environment, with this checkout's shipyard importable in subprocesses."""
    platform = str(REPO / "platform")
    path = cli_env.get("PYTHONPATH", "")
    if platform not in path.split(os.pathsep):
        cli_env["PYTHONPATH"] = os.pathsep.join(p for p in (platform, path) if p)
    return cli_env
