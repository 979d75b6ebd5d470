"""The GPU proof script (tests/gpu/): its no-GPU path, as CI runs it, and its pure helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "gpu"))
import proof  # noqa: E402
import records  # noqa: E402
import runner  # noqa: E402
from records import StepResult  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the proof would run")
def test_run_sh_without_a_gpu_skips_and_exits_0(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "tests/gpu/run.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert records.SKIPPED_LINE in out.stdout.splitlines()
    assert json.loads((tmp_path / "gpu-proof.jsonl").read_text()) == {"record": "skipped", "reason": "no CUDA device"}


def test_summary_line_and_records():
    results = [
        StepResult("env", True, 3.2, "NVIDIA H200 139.8 GiB", {"gpu": "NVIDIA H200"}),
        StepResult("lm_step", True, 41.0, "ddp/bare 1.004x (goal <= 1.02, met)", {"ratios": {"ddp/bare": 1.004}}),
        StepResult("lm_ddp", False, 150.0, error="timed out after 150s", timeout_s=150),
    ]
    line = records.summary_line(results, 194.6, "NVIDIA H200")
    assert line == ("gpu proof: 2/3 steps ok in 195s on NVIDIA H200 | env: NVIDIA H200 139.8 GiB | "
                    "lm_step: ddp/bare 1.004x (goal <= 1.02, met) | lm_ddp: FAILED (timed out after 150s)")
    assert "\n" not in line
    step = json.loads(results[2].to_json())
    assert step == {"record": "step", "step": "lm_ddp", "ok": False, "seconds": 150.0, "timeout_s": 150,
                    "error": "timed out after 150s", "brief": "", "figures": {}}
    summary = json.loads(records.summary_record(results, 194.6, "NVIDIA H200"))
    assert summary["ok"] == 2 and summary["steps"] == 3 and summary["failed"] == ["lm_ddp"]
    assert summary["line"] == line


def test_step_timeout_is_cut_to_the_budget():
    assert records.step_timeout(120, elapsed_s=10, budget_s=470) == 120
    assert records.step_timeout(120, elapsed_s=400, budget_s=470) == 65  # 470 - 5 reserve - 400
    assert records.step_timeout(120, elapsed_s=469, budget_s=470) == 0


def test_parsers_read_what_shipyard_run_and_the_benches_print():
    run = """lm: 1 workers x 1 CPU + 1 GPU, strategy fsdp, data /tmp/x/data
· restored from checkpoint at step 286 (/tmp/x/ck-fsdp/step-00000286)
lm: step 400/572 epoch 1  loss=1.9  41,000 samples/s
✓ lm finished: step 572/572 in 31.0s, 1 workers, 1 attempt, 40,511 samples/s
  metrics: loss=1.523  bits_per_byte=2.197  tokens_per_s=1.07e+07  step_time_s=0.0061  gpu_mem_gib=1.5
  latest checkpoint: /tmp/x/ck-fsdp/step-00000572"""
    assert records.restored_step(run) == 286
    assert records.finished_step(run) == (572, 572)
    assert records.run_metrics(run) == {"loss": 1.523, "bits_per_byte": 2.197, "tokens_per_s": 1.07e7,
                                        "step_time_s": 0.0061, "gpu_mem_gib": 1.5}
    assert records.restored_step("no checkpoint here") is None and records.finished_step("✗ lm failed") is None
    bench = 'warning: x\n{"side": "bare", "tokens_per_s": 5.0}\n{not json}\n[1]\n{"ratio": "ddp/bare", "step_time": 1.01}'
    assert records.json_lines(bench) == [{"side": "bare", "tokens_per_s": 5.0}, {"ratio": "ddp/bare", "step_time": 1.01}]
    assert records.pytest_summary("....\n4 passed, 1 skipped in 3.21s\n") == "4 passed, 1 skipped in 3.21s"
    assert records.pytest_summary("== 3 skipped in 0.50s ==") == "3 skipped in 0.50s"
    assert records.pytest_summary("collecting\nno tests ran in 0.01s") == "no tests ran in 0.01s"
    assert records.pytest_summary("E   assert 1 in [2]") is None
    assert records.ratio(1.004, 1.02) == "1.004x (goal <= 1.02, met)"
    assert records.ratio(0.2, 0.05) == "0.2x (goal <= 0.05, NOT met)"
    assert records.ratio(None, 0.05) == "n/a"


def test_a_step_that_hangs_is_killed_with_everything_it_started(tmp_path):
    """The step's whole process group goes at its timeout, children it left running included."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; echo started; wait"
    ran = runner.run_in_group(["bash", "-c", script], cwd=tmp_path, env=dict(os.environ), timeout_s=2,
                              scratch=tmp_path)
    assert ran.rc is None and ran.failure(2) == "timed out after 2s" and "started" in ran.text
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    done = runner.run_in_group(["bash", "-c", "echo hi; exit 3"], cwd=tmp_path, env=dict(os.environ),
                               timeout_s=30, scratch=tmp_path)
    assert (done.rc, done.text.strip(), done.failure(30)) == (3, "hi", "exit status 3")


def test_only_adds_prerequisites_and_keeps_the_order():
    assert proof.selected(None) == proof.ORDER
    assert proof.selected("lm_resume,env") == ["env", "data", "lm_fsdp", "lm_resume"]
    with pytest.raises(SystemExit, match="unknown step nope"):
        proof.selected("env,nope")


def test_lm_runs_use_the_real_cli_options():
    """The `shipyard run` command lines the proof builds are valid for jobs/lm/job.yaml."""
    from shipyard.spec import load_spec

    p = proof.Proof.__new__(proof.Proof)  # only what lm_argv reads
    p.sizes, p.data, p.work, p.checkpoints = proof.GPU, Path("/tmp/data"), Path("/tmp/w"), {}
    for strategy in ("ddp", "fsdp"):
        argv = proof.lm_argv(p, strategy, epochs=2)
        assert argv[1:5] == ["-m", "shipyard.cli", "run", "jobs/lm/job.yaml"]
        spec = load_spec(REPO / argv[4], argv[6::2])
        assert (spec.workers.count, spec.workers.gpus, spec.strategy.kind) == (1, 1, strategy)
        assert spec.checkpoint.async_upload and spec.checkpoint.uri == f"/tmp/w/ck-{strategy}"
        assert spec.dataset.epochs == 2 and spec.max_failures == 0
    assert spec.strategy.mixed_precision == "bf16"
