"""Step time and tokens/s of jobs/lm under shipyard (ddp and fsdp at world 1) vs a bare PyTorch
loop of the same model on the same device, in one run. Prints JSON lines; the last ones are the
ratios shipyard / bare (goal <= 1.02).

What "under shipyard" means here: the job's own code path on a rank -- ``TrainContext`` built from
jobs/lm/job.yaml (with overrides), ``ctx.prepare`` applying the strategy (DDP or FSDP2 over a
1-rank process group: NCCL on GPU, gloo on CPU), ``ctx.batches()`` streaming the Arrow shards with
prefetch, ``ctx.train_step``, ``ctx.clip_grad_norm_`` and ``ctx.report``. Ray's placement and the
driver's progress board are left out (they cost nothing per step: tests/bench/step_overhead.py
measures them). The bare loop reads the same shards into device tensors before it starts, then
runs forward, cross-entropy, backward, torch's clip_grad_norm_, AdamW. Both sides use the same
seed, model and fp32 weights (FSDP with ``mixed_precision: none``, so the comparison is of the
platform, not of bf16), and both synchronise the device at the end of every step so a step's
time is its own. The median of the steps after ``--warmup`` is reported; the sides alternate
(bare, ddp, fsdp, then again) ``--rounds`` times and are pooled, so machine drift lands on all.

Run: python tests/bench/lm_step.py [--steps N] [--rounds R] [--device cuda|cpu]
(CPU defaults to a small model so it runs in about a minute.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs" / "lm"))
from model import LM, LMConfig, next_token_loss  # noqa: E402

SIZES = {
    "cuda": {"context": 256, "dim": 512, "layers": 8, "heads": 8, "batch": 32},
    "cpu": {"context": 64, "dim": 64, "layers": 2, "heads": 4, "batch": 8},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, context: int) -> str:
    from shipyard.data.sources import open_source
    from shipyard.data.writer import write_dataset

    stdlib = sysconfig.get_paths()["stdlib"]
    uri = str(root / "data")
    write_dataset(open_source(f"text:{stdlib}/*.py:block={context + 1}"), uri, 4096)
    return uri


def bare(cfg, data, device, steps, batch, max_norm) -> list[float]:
    from shipyard.data import ShardStream

    torch.manual_seed(0)
    model = LM(LMConfig.from_dict(cfg)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    stream = ShardStream(data, batch_size=batch, epochs=100)
    batches = []
    for b in stream:
        batches.append(b["tokens"].to(device).long())
        if len(batches) == steps:
            break
    times, last = [], None
    sync(device)
    for tokens in batches:
        t0 = time.perf_counter()
        loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        last = loss
    return times, last.item()


def shipyard_side(kind, cfg, data, device, steps, batch, max_norm) -> list[float]:
    from shipyard.runtime.context import TrainContext
    from shipyard.spec import load_spec

    strategy = ["strategy.kind=" + kind] + (["strategy.mixed_precision=none"] if kind == "fsdp" else [])
    spec = load_spec(REPO / "jobs" / "lm" / "job.yaml", [
        f"dataset.uri={data}", f"dataset.batch_size={batch}", "dataset.epochs=100", "workers.count=1",
        "checkpoint=null", *strategy, *[f"config.{k}={v}" for k, v in cfg.items()]])
    ctx = TrainContext(spec, rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(0)
    model, opt = ctx.prepare(LM(LMConfig.from_dict(cfg)), lambda p: torch.optim.AdamW(
        p, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
    model.train()
    times, t0, loss = [], None, None
    sync(device)
    for b in ctx.batches():
        t0 = time.perf_counter() if t0 is None else t0
        tokens = b["tokens"].long()
        loss = ctx.train_step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
        ctx.clip_grad_norm_(max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.report(loss=loss)
        sync(device)
        now = time.perf_counter()
        times.append(now - t0)  # from the end of the last step: includes fetching this batch
        t0 = now
        if len(times) == steps:
            break
    ctx.close()
    return times, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.steps or (100 if device.type == "cuda" else 30)
    size = dict(SIZES[device.type])
    batch = size.pop("batch")
    cfg = {**size, "max_grad_norm": 1.0}
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    tokens_per_step = batch * size["context"]
    pooled: dict[str, list[float]] = {"bare": [], "ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), size["context"])
        for _ in range(args.rounds):
            for side in ("bare", "ddp", "fsdp"):
                if side == "bare":
                    times, loss = bare(cfg, data, device, steps, batch, 1.0)
                else:
                    times, loss = shipyard_side(side, cfg, data, device, steps, batch, 1.0)
                pooled[side] += times[args.warmup:]
                print(json.dumps({"side": side, "final_loss": round(loss, 5), "steps": len(times)}), flush=True)
    med = {k: statistics.median(v) for k, v in pooled.items()}
    for side, m in med.items():
        print(json.dumps({"side": side, "device": str(device), "model": cfg, "batch": batch,
                          "step_ms_median": round(m * 1e3, 3),
                          "step_ms_p90": round(statistics.quantiles(pooled[side], n=10)[-1] * 1e3, 3),
                          "tokens_per_s": round(tokens_per_step / m, 1)}))
    for side in ("ddp", "fsdp"):
        print(json.dumps({"ratio": f"{side}/bare", "step_time": round(med[side] / med["bare"], 4), "goal": 1.02}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
