"""`strategy: horovod` through `shipyard run` on the session's Ray cluster: a job switches from ddp by
changing one line, trains as well, and comes back from a killed worker like ddp does."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                       reason="horovod is not installed; `bash deploy/horovod.sh` builds it (deploy/test.sh runs it)"),
]
DIGITS = str(REPO / "jobs" / "digits" / "job.yaml")
RECORD = str(Path(__file__).parent / "jobs" / "record_ids" / "job.yaml")


def accuracy(output: str) -> float:
    found = re.findall(r"accuracy=([0-9.]+)", output)
    assert found, output[-3000:]
    return float(found[-1])


@pytest.fixture
def digits(digits_shards):
    return digits_shards


def test_digits_on_horovod_trains_as_well_as_on_ddp(shipyard, ray_address, digits, tmp_path):
    results = {}
    for kind in ("ddp", "horovod"):
        r = shipyard("run", DIGITS, "--set", f"strategy.kind={kind}", "--set", f"dataset.uri={digits / 'train'}",
                     "--set", f"dataset.eval_uri={digits / 'test'}", "--set", "dataset.epochs=10",
                     "--set", f"checkpoint.uri={tmp_path / kind}", env={"RAY_ADDRESS": ray_address})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "step 230/230" in r.stdout
        results[kind] = accuracy(r.stdout)
    print(results)
    assert results["horovod"] >= 0.95
    assert abs(results["horovod"] - results["ddp"]) <= 0.02


def test_killed_horovod_worker_resumes_to_the_weights_of_ddp(shipyard, ray_address, digits, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        out.mkdir()
        r = shipyard("run", RECORD, "--set", f"dataset.uri={digits / 'train'}", "--set", f"checkpoint.uri={out / 'ck'}",
                     "--set", f"config.out={out}", *extra, env={"RAY_ADDRESS": ray_address})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return out, r.stdout

    reference, _ = run("ddp")
    killed, stdout = run("horovod", "--set", "strategy.kind=horovod", "--set", "config.kills=[[25, 1]]")
    assert (killed / "killed-25").exists()
    assert re.search(r"#1 .*failed: rank 1: worker process (killed by SIGKILL|died)", stdout), stdout[-3000:]
    # From step 20, or from 10 when the step-20 upload was still in flight at the kill (async).
    assert re.search(r"restored from checkpoint at step (10|20)\b", stdout), stdout[-3000:]
    # Same data order, same averaging (a sum over 2 ranks, halved): Horovod's and DDP's weights agree
    # to float32 rounding, so the resumed Horovod run ended where an uninterrupted DDP run did.
    a, b = torch.load(reference / "final.pt"), torch.load(killed / "final.pt")
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k

