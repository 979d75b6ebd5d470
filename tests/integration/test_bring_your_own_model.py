"""Bring your own model: a GAN (two prepared models) under DDP on 2 real Ray workers, which
breaks out of ctx.batches() after step 20 (an early stop). With a rank SIGKILLed mid-run, both
models end bit-identical to an uninterrupted run's and ctx.state survives; the committed
checkpoint is at the stop step, marked finished, and running the job again says so without
training. (One test, three runs: the suite is slow enough.)"""

import re
from pathlib import Path

import pytest
import torch

from shipyard.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration
JOB = str(Path(__file__).parent / "jobs" / "gan" / "job.yaml")
STOP = 20  # of 23 steps (1,438 rows / 2 ranks / 32 a batch, one epoch)


def run(shipyard, ray_address, data, out: Path, *extra):
    out.mkdir(exist_ok=True)
    return shipyard("run", JOB, "--set", f"dataset.uri={data}", "--set", f"checkpoint.uri={out / 'ck'}",
                    "--set", f"config.out={out}", "--set", f"config.break_at={STOP}", *extra,
                    env={"RAY_ADDRESS": ray_address})


def steps(out: Path, rank: int) -> list[int]:
    return [int(s) for s in (out / f"rank{rank}.steps").read_text().split()]


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

    clean, chaos = torch.load(clean_out / "final.pt"), torch.load(chaos_out / "final.pt")
    assert clean["step"] == chaos["step"] == STOP
    for part in ("generator", "discriminator"):
        for k, v in clean[part].items():
            assert torch.equal(chaos[part][k], v), f"{part}.{k} differs from the uninterrupted run"
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
