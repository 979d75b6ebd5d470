"""The GPU proof: shipyard on one CUDA GPU, in one command, in at most 8 minutes (docs/gpu.md).

Each step is a subprocess in a session of its own with its own timeout, cut to what is left of
the whole budget; one that fails or hangs (its process group killed) is recorded, and the next
runs. Steps that need no Ray come first, so a Ray that hangs cannot cost the figures with goals:

  env         probe.py --full: GPU, torch, CUDA, NCCL, driver, a bf16 matmul rate, shipyard's imports
  lm_step     tests/bench/lm_step.py: shipyard (ddp, fsdp) vs a bare loop of the same model, same
              batches, in one run: step-time ratios (goal <= 1.02) and tokens/s
  checkpoint  tests/bench/checkpoint.py --stores local on the GPU: how long a save blocks training,
              async vs sync, for 1.2 GB of model + AdamW state (goal <= 0.05)
  pytest      the ``gpu``-marked tests under tests/gpu/ (NCCL all-reduce, CUDA checkpoint round trip)
  data        ``shipyard data shard`` of the standard library's .py files (jobs/lm's corpus)
  lm_ddp      ``shipyard run jobs/lm/job.yaml`` on 1 worker x 1 GPU under ddp, a few hundred
              steps, async checkpoints to a temporary directory
  lm_fsdp     the same under fsdp with bf16 mixed precision
  lm_resume   the fsdp run again with one more epoch: it restores the last checkpoint (the step is
              printed and checked against the store) and trains on from there

Everything goes as JSON lines (records.py) to ``$OUT/gpu-proof.jsonl`` when OUT is set (every
step's full output to ``$OUT/gpu-proof.log``); the last line printed is a one-line summary.
Exit status 0 when every step ran and produced its figures (goals are reported, not enforced).

Without a CUDA device: prints ``no CUDA device: GPU proof skipped`` and exits 0 (CI runs it as a
smoke test). ``--cpu-dry-run`` runs every step on CPU with tiny sizes (``workers.gpus=0``, gloo):
how the script itself is checked where there is no GPU. Nothing here reaches the network
(Ray's usage stats are off; the data is the local standard library).

Run: bash tests/gpu/run.sh [--only STEP,...] [--budget SECONDS] [--cpu-dry-run] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import (SKIPPED_LINE, StepResult, finished_step, json_lines, pytest_summary,  # noqa: E402
                     ratio, restored_step, run_metrics, step_timeout, summary_line, summary_record, tail)
from runner import Ran, free_port, run_in_group  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO / "platform"))  # shipyard, where it is not installed (the GPU machine)
PY = sys.executable
BUDGET_S = 470  # the brief's 8 minutes, less a margin for the wrapper and the summary
# Each step's own limit (seconds); the sum is above the budget on purpose: a slow step may use
# what a fast one left, but never more than this.
TIMEOUTS = {"env": 60, "lm_step": 120, "checkpoint": 120, "pytest": 90, "data": 60,
            "lm_ddp": 150, "lm_fsdp": 120, "lm_resume": 110}
ORDER = list(TIMEOUTS)
NEEDS = {"lm_ddp": ["data"], "lm_fsdp": ["data"], "lm_resume": ["data", "lm_fsdp"]}


@dataclass(frozen=True)
class Sizes:
    """What each step runs on: the GPU sizes, or tiny CPU ones for the dry run."""

    device: str
    gpus: int
    corpus_glob: str           # of the standard library's files: jobs/lm's corpus
    batch: int                 # rows per step in the lm runs: ~18k rows / 64 = ~290 steps an epoch
    every_steps: int           # async checkpoint interval of the lm runs
    model: tuple = ()          # config.* overrides of jobs/lm/job.yaml
    lm_step: tuple = ()        # extra tests/bench/lm_step.py arguments
    checkpoint: tuple = ()     # extra tests/bench/checkpoint.py arguments
    slack: float = 1.0         # times each step's timeout and the default budget


GPU = Sizes("cuda", 1, "*.py", 64, 100)
# The dry run's Ray start and worker group take minutes on a busy 2-core machine, not seconds.
CPU = Sizes("cpu", 0, "b*.py", 8, 20, model=(("dim", 32), ("layers", 1), ("heads", 2)),
            lm_step=("--steps", "8", "--rounds", "1", "--warmup", "2"), checkpoint=("--layers", "2", "--saves", "1"),
            slack=2.5)


class Proof:
    def __init__(self, sizes: Sizes, work: Path, out: Path | None, budget_s: float):
        self.sizes, self.work, self.budget_s = sizes, work, budget_s
        self.t0 = time.monotonic()
        self.results: list[StepResult] = []
        self.device_label = sizes.device
        self.records = open(out / "gpu-proof.jsonl", "w") if out else None
        self.log = open(out / "gpu-proof.log", "w") if out else open(work / "gpu-proof.log", "w")
        self.data = work / "data"
        self.checkpoints: dict[str, Path] = {}
        self.gpus = sizes.gpus  # what the GPU machine has, once the env step has looked

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray per run
        path = [str(REPO / "platform"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env.update(PYTHONPATH=os.pathsep.join(path), SHIPYARD_HOME=str(self.work / "home"),
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", COLUMNS="200",
                   MASTER_PORT=str(free_port()), TMPDIR=str(self.work / "t"))
        if self.sizes.device == "cuda" and "RAY_OVERRIDE_RESOURCES" not in env:
            # Ray counts GPUs through NVML; should that fail in the VM, say what torch saw, or the
            # runs would be refused with "the cluster has 0 GPUs".
            env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"GPU": self.gpus})
        return env

    def call(self, name: str, argv: list[str], timeout_s: float) -> Ran:
        """Run ``argv`` from the repo root; on timeout kill its whole process group (Ray's too)."""
        self.log.write(f"\n===== {name}: {shlex.join(argv)} (timeout {timeout_s:.0f}s)\n")
        self.log.flush()
        (self.work / "t").mkdir(exist_ok=True)
        ran = run_in_group(argv, cwd=REPO, env=self.env(), timeout_s=timeout_s, scratch=self.work)
        rc, text = ran.rc, ran.text
        self.log.write(text + f"\n===== {name}: {'killed at timeout' if rc is None else f'exit {rc}'}"
                       f" after {ran.seconds:.1f}s\n")
        self.log.flush()
        return ran

    def step(self, name: str, fn: Callable[["Proof", float], StepResult]) -> StepResult:
        timeout = step_timeout(TIMEOUTS[name] * self.sizes.slack, self.elapsed(), self.budget_s)
        t0 = time.monotonic()
        if timeout < 5:
            result = StepResult(name, False, 0.0, error="no time left in the budget")
        else:
            print(f"[{self.elapsed():4.0f}s] {name} (timeout {timeout:.0f}s) ...", flush=True)
            try:
                result = fn(self, timeout)
            except Exception as e:  # a bug in one step's parsing must not stop the others
                result = StepResult(name, False, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
            result = dataclasses.replace(result, timeout_s=round(timeout))
        self.results.append(result)
        if self.records:
            self.records.write(result.to_json() + "\n")
            self.records.flush()
        state = "ok" if result.ok else f"FAILED: {result.error}"
        print(f"[{self.elapsed():4.0f}s] {name}: {state} ({result.seconds:.0f}s) {result.brief}", flush=True)
        return result

    def finish(self) -> int:
        seconds = self.elapsed()
        if self.records:
            self.records.write(summary_record(self.results, seconds, self.device_label) + "\n")
            self.records.close()
        self.log.close()
        print(summary_line(self.results, seconds, self.device_label), flush=True)
        return 0 if all(r.ok for r in self.results) else 1


def failed(name: str, ran: Ran, timeout: float, why: str | None = None) -> StepResult:
    print(tail(ran.text), flush=True)
    return StepResult(name, False, ran.seconds, error=ran.failure(timeout) or why)


# -- the steps ----------------------------------------------------------------------------------

def env_step(p: Proof, timeout: float) -> StepResult:
    ran = p.call("env", [PY, "tests/gpu/probe.py", "--full"], timeout)
    facts = (json_lines(ran.text) or [{}])[-1]
    missing = {k: v for k, v in facts.get("imports", {}).items() if str(v).startswith("MISSING")}
    if ran.rc != 0 or not facts:
        return failed("env", ran, timeout, "probe printed nothing")
    if facts.get("device_count"):
        p.gpus = facts["device_count"]
    if facts.get("gpu"):
        p.device_label = f"{facts['gpu']} (torch {facts['torch']}, CUDA {facts['cuda']}, NCCL {facts.get('nccl')})"
    gpu = f"{facts['gpu']} ({facts['gpu_mem_gib']} GiB, driver {facts.get('driver')})" if facts.get("gpu") else "no GPU"
    brief = (f"{gpu}, torch {facts['torch']}, CUDA {facts['cuda']}, NCCL {facts.get('nccl', 'n/a')}, "
             f"bf16 matmul {facts.get('bf16_matmul_tflops', 'n/a')} TFLOP/s, ray {facts.get('imports', {}).get('ray')}")
    if p.sizes.device == "cuda" and not facts.get("cuda_available"):
        return StepResult("env", False, ran.seconds, brief, facts, error="CUDA not available")
    error = f"missing imports: {', '.join(missing)}" if missing else None
    if missing:
        print("\n".join(f"  {k}: {v}" for k, v in missing.items()), flush=True)
    return StepResult("env", not missing, ran.seconds, brief, facts, error=error)


def lm_step_step(p: Proof, timeout: float) -> StepResult:
    ran = p.call("lm_step", [PY, "tests/bench/lm_step.py", "--device", p.sizes.device, *p.sizes.lm_step], timeout)
    lines = json_lines(ran.text)
    ratios = {r["ratio"]: r["step_time"] for r in lines if "ratio" in r}
    sides = {r["side"]: r for r in lines if "tokens_per_s" in r}
    if ran.rc != 0 or not {"ddp/bare", "fsdp/bare"} <= ratios.keys():
        return failed("lm_step", ran, timeout, "no ratio lines in its output")
    tps = ", ".join(f"{s} {sides[s]['tokens_per_s']:,.0f}" for s in ("bare", "ddp", "fsdp") if s in sides)
    brief = (f"ddp/bare {ratio(ratios['ddp/bare'], 1.02)}, fsdp/bare {ratio(ratios['fsdp/bare'], 1.02)}; "
             f"tokens/s {tps}")
    figures = {"ratios": ratios, "goal": 1.02, "lines": lines}
    return StepResult("lm_step", True, ran.seconds, brief, figures)


def checkpoint_step(p: Proof, timeout: float) -> StepResult:
    argv = [PY, "tests/bench/checkpoint.py", "--device", p.sizes.device, "--stores", "local", *p.sizes.checkpoint]
    ran = p.call("checkpoint", argv, timeout)
    lines = json_lines(ran.text)
    value = next((r["value"] for r in lines if r.get("ratio") == "async_blocked/sync_blocked"), None)
    modes = {r["mode"]: r for r in lines if r.get("store") == "local" and "mode" in r}
    if ran.rc != 0 or value is None or not {"sync", "async"} <= modes.keys():
        return failed("checkpoint", ran, timeout, "no async/sync ratio in its output")
    gb = modes["sync"]["MB"] / 1e3
    brief = (f"async/sync blocked {ratio(value, 0.05)}: sync {modes['sync']['blocked_s']:.3f}s, "
             f"async {modes['async']['blocked_s'] * 1e3:.1f} ms, {gb:.2f} GB of state")
    ok = p.sizes.device != "cuda" or gb >= 1.0
    return StepResult("checkpoint", ok, ran.seconds, brief, {"async_over_sync": value, "goal": 0.05, "GB": gb,
                                                               "lines": lines},
                      error=None if ok else f"state was {gb:.2f} GB, the proof needs >= 1 GB")


def pytest_step(p: Proof, timeout: float) -> StepResult:
    argv = [PY, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
            "-o", "addopts=", f"--timeout={max(10, int(timeout) - 15)}"]
    ran = p.call("pytest", argv, timeout)
    summary = pytest_summary(ran.text)
    if ran.rc != 0 or summary is None:
        return failed("pytest", ran, timeout, "no pytest summary line")
    print(f"  pytest: {summary}", flush=True)
    return StepResult("pytest", True, ran.seconds, summary, {"summary": summary})


def data_step(p: Proof, timeout: float) -> StepResult:
    stdlib = sysconfig.get_paths()["stdlib"]
    src = f"text:{stdlib}/{p.sizes.corpus_glob}:block=257"  # jobs/lm: context 256 + the next-byte target
    ran = p.call("data", [PY, "-m", "shipyard.cli", "data", "shard", src, str(p.data), "--rows-per-shard", "4096"],
                 timeout)
    if ran.rc != 0 or not (p.data / "manifest.json").exists():
        return failed("data", ran, timeout, "no manifest.json written")
    from shipyard.data import read_manifest

    m = read_manifest(str(p.data))
    steps = m.rows // p.sizes.batch
    return StepResult("data", True, ran.seconds, f"{m.rows:,} rows ({m.bytes / 1e6:.1f} MB), ~{steps} steps an epoch",
                      {"rows": m.rows, "bytes": m.bytes, "steps_per_epoch": steps})


def lm_argv(p: Proof, strategy: str, epochs: int = 1) -> list[str]:
    ck = p.checkpoints.setdefault(strategy, p.work / f"ck-{strategy}")
    sets = {"workers.count": 1, "workers.gpus": p.sizes.gpus, "strategy.kind": strategy,
            "dataset.uri": p.data, "dataset.batch_size": p.sizes.batch, "dataset.epochs": epochs,
            "checkpoint.uri": ck, "checkpoint.every_steps": p.sizes.every_steps, "checkpoint.async_upload": "true",
            "checkpoint.keep_last": 2, "max_failures": 0, **{f"config.{k}": v for k, v in p.sizes.model}}
    if strategy == "fsdp":
        sets["strategy.mixed_precision"] = "bf16"  # bf16 compute on GPU (CPU always runs fp32)
    return [PY, "-m", "shipyard.cli", "run", "jobs/lm/job.yaml", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def latest_step(p: Proof, strategy: str) -> int | None:
    from shipyard.checkpoint import CheckpointStore

    record = CheckpointStore(str(p.checkpoints[strategy])).latest()
    return None if record is None else record.step


def lm_run(strategy: str) -> Callable[[Proof, float], StepResult]:
    name = f"lm_{strategy}"

    def run(p: Proof, timeout: float) -> StepResult:
        ran = p.call(name, lm_argv(p, strategy), timeout)
        done, metrics = finished_step(ran.text), run_metrics(ran.text)
        if ran.rc != 0 or done is None:
            return failed(name, ran, timeout, "no 'finished' line")
        latest = latest_step(p, strategy)
        figures = {"steps": done[0], "latest_checkpoint_step": latest, "wall_s": round(ran.seconds, 1), **metrics}
        brief = (f"{done[0]} steps, last checkpoint at {latest}, {metrics.get('tokens_per_s', 0):,.0f} tokens/s, "
                 f"step {metrics.get('step_time_s', float('nan')) * 1e3:.1f} ms, checkpoint blocked "
                 f"{metrics.get('checkpoint_blocked_s', float('nan')) * 1e3:.1f} ms, "
                 f"gpu_mem {metrics.get('gpu_mem_gib', 'n/a')} GiB, {ran.seconds:.0f}s wall")
        ok = latest == done[0]  # the final checkpoint is taken when the data is exhausted
        return StepResult(name, ok, ran.seconds, brief, figures,
                          error=None if ok else f"latest committed checkpoint is {latest}, the run ended at {done[0]}")
    return run


def resume_step(p: Proof, timeout: float) -> StepResult:
    done = {r.name for r in p.results if r.ok}
    strategy = next((s for s in ("fsdp", "ddp") if f"lm_{s}" in done), None)
    if strategy is None:
        return StepResult("lm_resume", False, 0.0, error="no lm run finished to resume from")
    before = latest_step(p, strategy)
    ran = p.call("lm_resume", lm_argv(p, strategy, epochs=2), timeout)  # one more epoch than it ran
    restored, finished = restored_step(ran.text), finished_step(ran.text)
    if ran.rc != 0 or finished is None:
        return failed("lm_resume", ran, timeout, "no 'finished' line")
    print(f"  lm_resume: restored step {restored} (latest committed before: {before})", flush=True)
    ok = restored is not None and restored == before and finished[0] > restored
    brief = f"{strategy}: restored step {restored}, trained on to step {finished[0]}, {ran.seconds:.0f}s wall"
    return StepResult("lm_resume", ok, ran.seconds, brief,
                      {"strategy": strategy, "restored_step": restored, "latest_before": before,
                       "final_step": finished[0], **run_metrics(ran.text)},
                      error=None if ok else f"restored {restored}, expected {before} and training past it")


STEPS: dict[str, Callable[[Proof, float], StepResult]] = {
    "env": env_step, "lm_step": lm_step_step, "checkpoint": checkpoint_step, "pytest": pytest_step,
    "data": data_step, "lm_ddp": lm_run("ddp"), "lm_fsdp": lm_run("fsdp"), "lm_resume": resume_step}


def selected(only: str | None) -> list[str]:
    if not only:
        return ORDER
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    unknown = wanted - set(ORDER)
    if unknown:
        raise SystemExit(f"--only: unknown step {', '.join(sorted(unknown))}; steps: {', '.join(ORDER)}")
    for s in list(wanted):
        wanted.update(NEEDS.get(s, []))
    return [s for s in ORDER if s in wanted]


def cuda_present(timeout_s: float = 120) -> bool | None:
    """Whether torch sees a CUDA device (None: the probe failed, so it is not known)."""
    try:
        out = subprocess.run([PY, str(REPO / "tests/gpu/probe.py")], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    facts = json_lines(out.stdout)
    return bool(facts[-1].get("cuda_available")) if out.returncode == 0 and facts else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated steps (their prerequisites are added): {', '.join(ORDER)}")
    ap.add_argument("--budget", type=float, help=f"seconds for the whole proof (default {BUDGET_S}; "
                                                  f"x{CPU.slack:g} for --cpu-dry-run)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every step on CPU, tiny sizes")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (data, checkpoints)")
    args = ap.parse_args(argv)
    steps = selected(args.only)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_dry_run:
        present = cuda_present()
        if present is False:
            if out:
                (out / "gpu-proof.jsonl").write_text('{"record": "skipped", "reason": "no CUDA device"}\n')
            print(SKIPPED_LINE, flush=True)
            return 0
        if present is None:
            print("could not tell whether a CUDA device is there (probe failed); running the proof anyway", flush=True)
    sizes = CPU if args.cpu_dry_run else GPU
    args.budget = args.budget or BUDGET_S * sizes.slack
    # Short: Ray's socket paths under TMPDIR (work/t/ray/session_.../sockets/...) must stay < 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="sygpu-", dir="/tmp" if os.path.isdir("/tmp") else None))
    print(f"gpu proof: {sizes.device}, steps {', '.join(steps)}, budget {args.budget:.0f}s, work dir {work}, "
          f"records {out / 'gpu-proof.jsonl' if out else '(OUT not set: none)'}", flush=True)
    proof = Proof(sizes, work, out, args.budget)
    try:
        for name in steps:
            proof.step(name, STEPS[name])
    finally:
        rc = proof.finish()
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
