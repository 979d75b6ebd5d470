"""Train the byte-level LSTM (model.py) on text rows, data-parallel under ddp or fsdp.

Each row is ``context + 1`` bytes: the model reads the first ``context`` and predicts each next
byte. ``config.out`` (optional, for tests): each rank appends its per-step loss to
``rank<r>.jsonl``.
"""

import json
import math
from pathlib import Path

import torch

from model import CharLSTM, next_token_loss


def train(ctx):
    cfg = ctx.config
    torch.manual_seed(cfg.get("seed", 0))  # same initial weights on every rank
    model, optimizer = ctx.prepare(CharLSTM(cfg["dim"], cfg["hidden"], cfg["layers"]),
                                   lambda params: torch.optim.AdamW(params, lr=cfg["lr"]))
    out = Path(cfg["out"]) if cfg.get("out") else None
    model.train()
    for batch in ctx.batches():
        tokens = batch["tokens"].long()
        loss = ctx.train_step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
        ctx.clip_grad_norm_(cfg["max_grad_norm"])  # LSTMs' gradients spike; clip by the global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.report(loss=loss, bits_per_byte=loss / math.log(2))
        if out is not None:
            with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "loss": loss.item()}) + "\n")
