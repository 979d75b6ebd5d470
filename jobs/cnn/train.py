"""Train the small ResNet (model.py) on the digits images, under ddp or fsdp.

Test hooks (all optional, under ``config``): ``out`` (a folder: each rank appends its per-step
loss to ``rank<r>.jsonl`` and writes its final weights and BatchNorm buffers, with the names of
those it held as shards, to ``final-rank<r>.pt``), ``kills`` (a list of ``[step, rank]``:
SIGKILL that rank's process once at that step).
"""

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model import ResNet


def evaluate(ctx, model) -> float:
    model.eval()
    counts = torch.zeros(2)
    with torch.no_grad():
        for batch in ctx.eval_batches():  # collective: every rank, same buffers (rank 0's)
            pred = model(batch["x"]).argmax(dim=1)
            counts += torch.tensor([(pred == batch["y"]).sum().item(), len(pred)])
    dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[1]).item()


def full_state(model) -> dict:
    """Weights and buffers as plain tensors (FSDP's DTensors gathered: collective)."""
    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 does not
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in inner.state_dict().items()}


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(cfg.get("seed", 0))  # same initial weights on every rank
    model, optimizer = ctx.prepare(ResNet(cfg["width"], cfg["blocks"]),
                                   lambda params: torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=1e-4))
    out = Path(cfg["out"]) if cfg.get("out") else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for batch in ctx.batches():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        ctx.report(loss=loss, epoch=ctx.epoch)
        if out is not None:
            with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "loss": loss.item()}) + "\n")
            for step, rank in cfg.get("kills", []):
                marker = out / f"killed-{step}"
                if ctx.step == step and ctx.rank == rank and not marker.exists():
                    marker.write_text(f"{time.time()}")
                    os.kill(os.getpid(), signal.SIGKILL)
    if ctx.spec.dataset.eval_uri:
        ctx.report(accuracy=evaluate(ctx, model))
    if out is not None:
        sharded = sorted(k for k, v in getattr(model, "module", model).state_dict().items() if hasattr(v, "full_tensor"))
        torch.save({"step": ctx.step, "model": full_state(model), "sharded": sharded}, out / f"final-rank{ctx.rank}.pt")
