"""Test job: a tiny GAN on digits, two prepared models (generator, discriminator) under DDP.

Keeps a running total and the best discriminator loss in ``ctx.state``. ``config.kills`` (a list
of ``[step, rank]``) SIGKILLs that rank's process once at each of those steps;
``config.break_at`` breaks out of ``ctx.batches()`` on every rank after that step (an early
stop).
Rank 0 writes both models' final weights and ``ctx.state`` to ``config.out``/final.pt.
"""

import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def train(ctx):
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))
    generator, opt_g = ctx.prepare(g, lambda p: torch.optim.Adam(p, lr=1e-3), name="generator")
    discriminator, opt_d = ctx.prepare(torch.nn.Linear(64, 1), lambda p: torch.optim.Adam(p, lr=1e-3),
                                       name="discriminator")
    out = Path(ctx.config["out"])
    for batch in ctx.batches():
        real = batch["x"].float() / 16
        fake = generator(torch.randn(len(real), 8))
        opt_d.zero_grad()
        scores = discriminator(torch.cat([real, fake.detach()]))
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
        d_loss = F.binary_cross_entropy_with_logits(scores, labels)
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = F.binary_cross_entropy_with_logits(discriminator(fake), torch.ones(len(real), 1))
        g_loss.backward()
        opt_g.step()
        # The same on every rank: all-reduced before it goes into ctx.state.
        mean = d_loss.detach().clone()
        torch.distributed.all_reduce(mean)
        mean = mean.item() / ctx.world_size
        ctx.state["steps"] = ctx.state.get("steps", 0) + 1
        ctx.state["best_d_loss"] = min(ctx.state.get("best_d_loss", float("inf")), mean)
        ctx.state["d_loss_sum"] = ctx.state.get("d_loss_sum", torch.zeros(1, dtype=torch.float64)) + mean  # a tensor
        ctx.report(d_loss=d_loss, g_loss=g_loss)
        with open(out / f"rank{ctx.rank}.steps", "a") as f:
            f.write(f"{ctx.step}\n")
        for step, rank in ctx.config.get("kills", []):
            marker = out / f"killed-{step}"
            if ctx.step == step and ctx.rank == rank and not marker.exists():
                marker.write_text(f"{time.time()}")
                os.kill(os.getpid(), signal.SIGKILL)
        if ctx.step == ctx.config.get("break_at"):
            break
    if ctx.rank == 0:
        torch.save({"generator": generator.module.state_dict(), "discriminator": discriminator.module.state_dict(),
                    "state": dict(ctx.state), "step": ctx.step}, out / "final.pt")
