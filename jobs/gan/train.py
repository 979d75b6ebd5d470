"""Train the GAN (model.py) on the digits images: two prepared models, two optimizers, under ddp
or fsdp.

Each step trains the discriminator on real rows and the generator's rows, then the generator
against the updated discriminator. The initial weights come from one seed on every rank (FSDP
does not broadcast them); the noise from a seed per rank, set after both models are built, so
the data-parallel ranks generate different rows. That RNG is checkpointed per rank, so a resumed
run draws the noise the uninterrupted one would have.

``ctx.state`` keeps the steps taken, the best and the running total of the discriminator's loss
(all-reduced: the same on every rank).

Test hooks (all optional, under ``config``): ``out`` (a folder: each rank appends its per-step
losses to ``rank<r>.jsonl`` and writes both models' final weights and ``ctx.state`` to
``final-rank<r>.pt``), ``kills`` (a list of ``[step, rank]``: SIGKILL that rank's process once
at that step), ``break_at`` (break out of ``ctx.batches()`` after that step: an early stop).
"""

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model import Discriminator, Generator, d_loss, g_loss


def full_state(model) -> dict:
    """Weights as plain tensors (FSDP's DTensors gathered: collective)."""
    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 does not
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in inner.state_dict().items()}


def train(ctx):
    cfg = ctx.config
    seed = cfg.get("seed", 0)
    torch.manual_seed(seed)  # the same initial weights on every rank
    adam = lambda params: torch.optim.Adam(params, lr=cfg.get("lr", 2e-3), betas=(0.5, 0.999))  # noqa: E731
    generator, opt_g = ctx.prepare(Generator(cfg.get("noise", 16), cfg.get("hidden", 64)), adam, name="generator")
    discriminator, opt_d = ctx.prepare(Discriminator(cfg.get("hidden", 64)), adam, name="discriminator")
    torch.manual_seed(seed + 1 + ctx.dp_rank)  # each rank its own noise (restored on resume)
    out = Path(cfg["out"]) if cfg.get("out") else None
    for batch in ctx.batches():
        real = batch["x"]
        fake = generator(torch.randn(len(real), cfg.get("noise", 16)))
        opt_d.zero_grad(set_to_none=True)
        loss_d = d_loss(discriminator, real, fake)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        loss_g = g_loss(discriminator, fake)
        loss_g.backward()
        opt_g.step()
        mean = loss_d.detach().clone()
        dist.all_reduce(mean)
        mean = mean.item() / ctx.world_size
        ctx.state["steps"] = ctx.state.get("steps", 0) + 1
        ctx.state["best_d_loss"] = min(ctx.state.get("best_d_loss", float("inf")), mean)
        ctx.state["d_loss_sum"] = ctx.state.get("d_loss_sum", torch.zeros(1, dtype=torch.float64)) + mean  # a tensor
        ctx.report(d_loss=loss_d, g_loss=loss_g)
        if out is not None:
            with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "loss": loss_d.item(), "g_loss": loss_g.item()}) + "\n")
            for step, rank in cfg.get("kills", []):
                marker = out / f"killed-{step}"
                if ctx.step == step and ctx.rank == rank and not marker.exists():
                    marker.write_text(f"{time.time()}")
                    os.kill(os.getpid(), signal.SIGKILL)
        if ctx.step == cfg.get("break_at"):
            break
    if out is not None:
        torch.save({"generator": full_state(generator), "discriminator": full_state(discriminator),
                    "state": dict(ctx.state), "step": ctx.step}, out / f"final-rank{ctx.rank}.pt")
