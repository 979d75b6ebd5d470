"""Test job: trains a linear model on digits and records each step's sample ids per rank.

With ``config.crash_at``, rank 0 fails once at that step (a marker file stops it failing
again after the restart), as a worker dying mid-epoch would. With ``config.sigterm_at``, rank 1
sends itself SIGTERM once after that step, as a Kubernetes eviction or a spot notice would.
``config.kills`` (a list of ``[step, rank]``) SIGKILLs that rank's process once at each of those
steps; ``config.hang_at`` makes rank 1 sleep once after that step (a hung rank);
``config.fail_at`` raises on rank 0 at that step in every attempt (a bug no restart fixes);
``config.nan_at`` makes the reported loss NaN from that step on (a diverged model);
``config.step_sleep_s`` slows every step down, ``config.slow_at_world`` only steps at that world
size (so a test can act on a running job); ``config.print_env`` prints rank 0's environment once
(a test then checks that none of the server's secrets reached the job).
"""

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def train(ctx):
    torch.manual_seed(0)
    model, optimizer = ctx.prepare(torch.nn.Linear(64, 10), lambda p: torch.optim.SGD(p, lr=0.1))
    out = Path(ctx.config["out"])
    crash_at = ctx.config.get("crash_at")
    sigterm_at = ctx.config.get("sigterm_at")
    if ctx.config.get("print_env") and ctx.rank == 0:
        print("environment: " + " ".join(sorted(f"{k}={v}" for k, v in os.environ.items())), flush=True)
    for batch in ctx.batches():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": ctx.step, "epoch": ctx.epoch, "world": ctx.world_size, "t": time.time(),
                                "pid": os.getpid(),
                                "ids": batch["id"].tolist()}) + "\n")
        nan_at = ctx.config.get("nan_at")
        ctx.report(loss=torch.tensor(float("nan")) if nan_at and ctx.step >= nan_at else loss)
        time.sleep(ctx.config.get("step_sleep_s", 0))
        if ctx.config.get("slow_at_world") == ctx.world_size:
            time.sleep(0.5)
        if crash_at and ctx.rank == 0 and ctx.step == crash_at and not (out / "crashed").exists():
            (out / "crashed").touch()
            raise RuntimeError(f"injected failure at step {ctx.step}")
        if sigterm_at and ctx.rank == 1 and ctx.step == sigterm_at and not (out / "sigterm").exists():
            (out / "sigterm").write_text(str(ctx.step))
            os.kill(os.getpid(), signal.SIGTERM)
        for step, rank in ctx.config.get("kills", []):
            marker = out / f"killed-{step}"
            if ctx.step == step and ctx.rank == rank and not marker.exists():
                marker.write_text(f"{time.time()}")
                os.kill(os.getpid(), signal.SIGKILL)
        if ctx.config.get("hang_at") == ctx.step and ctx.rank == 1 and not (out / "hung").exists():
            (out / "hung").touch()
            time.sleep(3600)
        if ctx.config.get("fail_at") == ctx.step and ctx.rank == 0:
            raise RuntimeError(f"injected bug at step {ctx.step}")
    if ctx.rank == 0:
        torch.save(getattr(model, "module", model).state_dict(), out / "final.pt")
