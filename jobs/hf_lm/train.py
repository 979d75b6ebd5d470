"""Train a Hugging Face Llama (hf_model.py) as it comes, under any strategy (see README.md).

The loop is jobs/lm's: ``ctx.prepare`` wraps the model for the strategy, ``ctx.train_step``
runs forward and backward, ``ctx.clip_grad_norm_`` clips by the whole model's norm.
"""

import json
import math
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from hf_model import build, next_token_loss


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(cfg.get("seed", 0))  # same initial weights on every rank
    model = build(cfg)
    full_bytes = sum(p.nbytes for p in model.parameters())
    model, optimizer = ctx.prepare(model, lambda params: torch.optim.AdamW(
        params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.0)))
    out = Path(cfg["out"]) if cfg.get("out") else None  # per-step records, for tests
    if out is not None:  # what this rank holds, and which modules FSDP made units of
        local = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
        units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        (out / f"params-rank{ctx.rank}.json").write_text(json.dumps({"local": local, "full": full_bytes, "units": units}))
    model.train()
    clip = cfg.get("max_grad_norm")
    for batch in ctx.batches():
        tokens = batch["tokens"].long()
        loss = ctx.train_step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
        if clip:
            ctx.clip_grad_norm_(clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.report(loss=loss, bits_per_byte=loss / math.log(2))
        if out is not None:
            with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "loss": loss.item()}) + "\n")
