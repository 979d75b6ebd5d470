"""Bring your own model: jobs/gan (two prepared models) under DDP on 2 real Ray workers, which
breaks out of ctx.batches() after step 20 (an early stop). With a rank SIGKILLed mid-run, both
models end bit-identical to an uninterrupted run's and ctx.state survives; the committed
checkpoint is at the stop step, marked finished, and running the job again says so without
training. (One test, three runs: the suite is slow enough.)"""

import json
import re
from pathlib import Path

import pytest
import torch

from shipyard.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration
JOB = str(Path(__file__).parents[2] / "jobs" / "gan" / "job.yaml")
STOP = 20  # of 23 steps (1,438 rows / 2 ranks / 32 a batch, one epoch)


def run(shipyard, ray_address, data, out: Path, *extra):
    out.mkdir(exist_ok=True)
    sets = {"dataset.uri": data, "dataset.epochs": 1, "checkpoint.uri": out / "ck", "checkpoint.every_steps": 5,
            "checkpoint.keep_last": "null", "max_failures": 1, "config.out": out, "config.break_at": STOP}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return shipyard("run", JOB, *args, *extra, env={"RAY_ADDRESS": ray_address})


def steps(out: Path, rank: int) -> list[int]:
    return [json.loads(line)["step"] for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def test_gan_killed_and_stopped_early_resumes_bit_identical_and_stays_finished(
        shipyard, ray_address, digits_shards, tmp_path):
    data, clean_out, chaos_out = digits_shards / "train", tmp_path / "clean", tmp_path / "chaos"
    r = run(shipyard, ray_address, data, clean_out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run(shipyard, ray_address, data, chaos_out, "--set", "config.kills=[[12, 1]]")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (chaos_out / "killed-12").exists()
    # From step 10, or 5 when the upload of step 10 was still in flight at the kill (async).
    restored = re.search(r"restored from checkpoint at step (5|10) ", r.stdout)
    assert restored and "2 attempts" in r.stdout, r.stdout[-3000:]

    clean, chaos = torch.load(clean_out / "final-rank0.pt"), torch.load(chaos_out / "final-rank0.pt")
    assert clean["step"] == chaos["step"] == STOP
    for rank in (0, 1):  # rank 1 was the one killed; its noise came back with its RNG state
        ended = torch.load(chaos_out / f"final-rank{rank}.pt")
        for part in ("generator", "discriminator"):
            for k, v in clean[part].items():
                assert torch.equal(ended[part][k], v), f"rank {rank}: {part}.{k} differs from the uninterrupted run"
    # ctx.state came back with the checkpoint: the resumed run's totals are the clean run's.
    assert chaos["state"]["steps"] == clean["state"]["steps"] == STOP
    assert chaos["state"]["best_d_loss"] == clean["state"]["best_d_loss"]
    assert torch.equal(chaos["state"]["d_loss_sum"], clean["state"]["d_loss_sum"])

    # The break: a committed checkpoint at the stop step, marked finished, holding both models.
    record = CheckpointStore(str(chaos_out / "ck")).latest()
    assert record.step == STOP and record.parts == ["generator", "discriminator"]
    assert record.finished == {"reason": f"break out of ctx.batches() after step {STOP}", "epochs": 1}
    assert record.state["json"]["steps"] == STOP and set(record.state["tensors"]) == {"d_loss_sum"}

    trained = steps(chaos_out, 0)
    again = run(shipyard, ray_address, data, chaos_out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"gan already finished: stopped at step {STOP} (break out of ctx.batches() after step {STOP})" in again.stdout
    assert steps(chaos_out, 0) == trained  # nothing trained


CNN_JOB = str(Path(__file__).parents[2] / "jobs" / "cnn" / "job.yaml")


def run_cnn(shipyard, ray_address, digits, out: Path, *extra):
    out.mkdir(exist_ok=True)
    sets = {"dataset.uri": digits / "train", "dataset.eval_uri": digits / "test", "dataset.epochs": 1,
            "checkpoint.uri": out / "ck", "checkpoint.every_steps": 5, "checkpoint.keep_last": "null",
            "config.out": out, "config.width": 8, "max_failures": 1}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return shipyard("run", CNN_JOB, *args, *extra, env={"RAY_ADDRESS": ray_address})


def test_batchnorm_cnn_killed_resumes_with_bit_identical_weights_and_running_stats(
        shipyard, ray_address, digits_shards, tmp_path):
    """jobs/cnn (BatchNorm) under DDP, rank 1 SIGKILLed at step 12 of 23: the resumed run ends
    with the uninterrupted run's weights and running statistics, bit for bit, on both ranks. (Each
    checkpoint holds rank 0's buffers, which DDP's next forward would give every rank anyway;
    without the sync it may hold rank 1's, and the resumed run's statistics then differ.)"""
    clean_out, chaos_out = tmp_path / "clean", tmp_path / "chaos"
    r = run_cnn(shipyard, ray_address, digits_shards, clean_out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_cnn(shipyard, ray_address, digits_shards, chaos_out, "--set", "config.kills=[[12, 1]]")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (chaos_out / "killed-12").exists()
    assert re.search(r"restored from checkpoint at step (5|10) ", r.stdout), r.stdout[-3000:]

    clean = torch.load(clean_out / "final-rank0.pt")
    assert clean["step"] == 23
    assert sum(k.endswith("running_var") for k in clean["model"]) == 5  # stem + 2 blocks x 2
    for rank in (0, 1):
        chaos = torch.load(chaos_out / f"final-rank{rank}.pt")
        assert chaos["step"] == 23
        for k, v in clean["model"].items():
            assert torch.equal(chaos["model"][k], v), f"rank {rank}: {k} differs from the uninterrupted run"
