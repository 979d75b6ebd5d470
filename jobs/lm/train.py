"""Train the byte-level LM (model.py) under whatever strategy the job spec names.

The same loop runs under ddp, fsdp, tensor, pipeline and hybrid: ``ctx.train_step`` does the
forward and backward (a pipeline schedule under ``pipeline``), ``ctx.clip_grad_norm_`` clips by
the whole model's norm however it is split.
"""

import json
import math
import time
from pathlib import Path

import torch

from model import LM, LMConfig, next_token_loss


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this rank holds (a DTensor counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(cfg.get("seed", 0))  # same initial weights on every rank
    model = LM(LMConfig.from_dict(cfg))
    full_bytes = sum(p.nbytes for p in model.parameters())
    model, optimizer = ctx.prepare(model, lambda params: torch.optim.AdamW(
        params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.0)))
    out = Path(cfg["out"]) if cfg.get("out") else None  # per-step records, for tests
    if out is not None:
        (out / f"params-rank{ctx.rank}.json").write_text(json.dumps(
            {"local": local_parameter_bytes(model), "full": full_bytes, "world": ctx.world_size}))
    model.train()
    clip = cfg.get("max_grad_norm")
    started, tokens_seen = time.monotonic(), 0
    for batch in ctx.batches():
        tokens = batch["tokens"].long()
        loss = ctx.train_step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
        norm = ctx.clip_grad_norm_(clip) if clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens[:, 1:].numel() * ctx.dp_world
        ctx.report(loss=loss, bits_per_byte=loss / math.log(2),
                   tokens_per_s=tokens_seen / max(time.monotonic() - started, 1e-9))
        if out is not None:
            with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "loss": loss.item(),
                                    "grad_norm": None if norm is None else norm.item()}) + "\n")
