"""jobs/lm's model under ``strategy: {kind: custom}``: the job shards it itself with FSDP2 on
``ctx.mesh["dp"]`` (one unit per block, then the root, as a user's own parallelize function would),
and shipyard only builds the optimizer, streams the data and checkpoints through DCP."""

import json
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from model import LM, LMConfig, next_token_loss


def parallelize(model, mesh):
    for block in model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(cfg.get("seed", 0))
    model = parallelize(LM(LMConfig.from_dict(cfg)), ctx.mesh)
    model, optimizer = ctx.prepare(model, lambda params: torch.optim.AdamW(
        params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.0)))
    sharded = all(hasattr(p, "to_local") for p in model.parameters())
    out = Path(cfg["out"])
    for batch in ctx.batches():
        tokens = batch["tokens"].long()
        loss = ctx.train_step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
        ctx.clip_grad_norm_(cfg["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.report(loss=loss)
        with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": ctx.step, "loss": loss.item(), "sharded": sharded}) + "\n")
