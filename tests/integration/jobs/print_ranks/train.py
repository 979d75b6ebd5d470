"""Test job: each rank prints known lines, so a test can count them in `shipyard run`'s output.

Every ``config.every`` steps (default 5) each rank prints ``hello from rank R at step S``; at its
first step each prints one line to stderr, one coloured line and one long line (> 80 columns),
and logs one warning. With ``config.fail_at``, rank 0 raises at that step.
"""

import logging
import sys

import torch
import torch.nn.functional as F

LONG = "a long line that a terminal of 80 columns would fold: " + "x" * 120


def train(ctx):
    torch.manual_seed(0)
    model, optimizer = ctx.prepare(torch.nn.Linear(64, 10), lambda p: torch.optim.SGD(p, lr=0.1))
    every = ctx.config.get("every", 5)
    for batch in ctx.batches():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        ctx.report(loss=loss)
        if ctx.step == 1:
            print(f"to stderr from rank {ctx.rank}", file=sys.stderr, flush=True)
            print(f"\x1b[31mcoloured\x1b[0m from rank {ctx.rank}", flush=True)
            print(f"{LONG} rank {ctx.rank}", flush=True)
            logging.getLogger("print_ranks").warning("a warning from rank %d", ctx.rank)
        if ctx.step % every == 0:
            print(f"hello from rank {ctx.rank} at step {ctx.step}", flush=True)
        if ctx.config.get("fail_at") == ctx.step and ctx.rank == 0:
            raise RuntimeError(f"injected failure at step {ctx.step}")
