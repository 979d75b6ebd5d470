"""Step-time overhead of `shipyard run` against plain torchrun, on the same loop and data.

What is measured: the steady-state wall time of one training step on rank 0 of a 2-process
data-parallel job on CPU (DDP over gloo), under `shipyard run` (Ray Train TorchTrainer,
2 workers) and under `torchrun --nproc_per_node=2`. A step is the span between two
consecutive passes through the loop: fetching the batch, forward, backward, optimizer step and,
under shipyard, `ctx.report(loss=...)` as a user loop would call it. So everything the platform
does per step (its batch iterator, its data reading and prefetch thread, metric pushes, and the
Ray processes sharing the machine) lands in the shipyard number. The first `--warmup` steps of
each run are dropped; the median and p90 of the rest are reported, and the last JSON line is the
ratio shipyard / torchrun (goal <= 1.02). Each side runs `--rounds` times (default 2, in the order
T S S T, pooled) so that a slow drift of the machine's speed does not land on one side only:
on a small shared machine run-to-run noise is a few percent, as large as the goal's margin.

Why it is fair: both sides run `timed_loop` below, from this one file (shipyard loads it as the
job's entrypoint `step_overhead.py:train`; torchrun runs it with `--torchrun-worker`), with the
same MLP, seed, SGD, `torch.set_num_threads(1)` on each of the two processes, DDP defaults and
the same number of steps. Both consume the same batches: the synthetic dataset is sharded once
with `shipyard data shard`, and the job runs with `dataset.shuffle: false`, so rank r's share of
each epoch is rows [r*L, (r+1)*L) in file order with L = rows // 2. The baseline reads the same
shard files with plain pyarrow into tensors before its loop (outside the timed region) and slices
that share into batches; shipyard reads them through its own data path (ShardStream) while
training, which is part of what we measure. The final losses of both sides are printed: equal
losses show the two sides really trained on the same batches. No checkpoint section is given,
so no checkpoints are taken.

Run: python tests/bench/step_overhead.py [--steps N] [--rounds R] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def make_model(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def timed_loop(model, optimizer, batches, total_steps: int, report) -> dict:
    """The loop both sides run. Step time = time between consecutive loop passes, so nothing
    (batch fetch, metrics, the iterator's own bookkeeping) falls between two measurements;
    fetch time (the part spent in next(batches)) is kept apart too, to help attribute overhead."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    it = iter(batches)
    times, fetch, loss = [], [], None
    last = time.perf_counter()
    for _ in range(total_steps):
        batch = next(it)
        fetched = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
        report(loss)
        now = time.perf_counter()
        times.append(now - last)
        fetch.append(fetched - last)
        last = now
    return {"times": times, "fetch": fetch, "final_loss": loss.item()}


# -- shipyard side: the job's entrypoint ------------------------------------------------------
def train(ctx) -> None:
    c = ctx.config
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, optimizer = ctx.prepare(make_model(c["dim"], c["hidden"]),
                                   lambda params: torch.optim.SGD(params, lr=c["lr"]))
    result = timed_loop(model, optimizer, ctx.batches(), c["total_steps"], lambda loss: ctx.report(loss=loss))
    if ctx.rank == 0:
        Path(c["out"]).write_text(json.dumps(result))


# -- torchrun side ----------------------------------------------------------------------------
def load_share(data: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's share of one unshuffled epoch, read with plain pyarrow: rows [r*L, (r+1)*L)."""
    import pyarrow as pa

    manifest = json.loads((Path(data) / "manifest.json").read_text())
    tables = [pa.ipc.open_file(pa.memory_map(str(Path(data) / s["name"]))).read_all()
              for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    per = table.num_rows // world
    share = table.slice(rank * per, per)
    x, y = share.column("x").combine_chunks(), share.column("y").combine_chunks()
    xs = torch.from_numpy(x.flatten().to_numpy(zero_copy_only=False, writable=True).reshape(per, -1))
    ys = torch.from_numpy(y.to_numpy(zero_copy_only=False, writable=True))
    return xs.contiguous(), ys.contiguous()


def torchrun_worker(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = load_share(args.data, rank, world)
    torch.manual_seed(0)
    model = DistributedDataParallel(make_model(args.dim, args.hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    b = args.batch_size

    def batches():
        while True:  # epochs, each in file order, as shipyard's unshuffled stream
            for i in range(0, len(x), b):
                yield {"x": x[i:i + b], "y": y[i:i + b]}

    dist.barrier()
    result = timed_loop(model, optimizer, batches(), args.total_steps, lambda loss: None)
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


# -- driver -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dataset(root: Path, rows: int, dim: int, rows_per_shard: int, env: dict) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    y = rng.integers(0, 10, rows).astype(np.int64)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
                             "y": pa.array(y)}), root / "src.parquet")
    dest = root / "shards"
    run([str(BIN / "shipyard"), "data", "shard", str(root / "src.parquet"), str(dest),
         "--rows-per-shard", str(rows_per_shard)], env, root / "shard.log")
    return dest


def run(cmd: list[str], env: dict, log: Path, timeout: float = 600) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE)
    if r.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{cmd[0]} exited {r.returncode}; log: {log}")
    return time.monotonic() - t0


def summarize(side: str, runs: list[tuple[dict, float]], warmup: int) -> dict:
    """Pool one side's runs: steps after each run's warm-up, all rounds together."""
    import numpy as np

    t = np.concatenate([r["times"][warmup:] for r, _ in runs])
    f = np.concatenate([r["fetch"][warmup:] for r, _ in runs])
    return {"bench": "step_overhead", "side": side, "median_step_s": float(np.median(t)),
            "p90_step_s": float(np.percentile(t, 90)), "mean_step_s": float(t.mean()), "steps": len(t),
            "median_fetch_s": float(np.median(f)), "p90_fetch_s": float(np.percentile(f, 90)),
            "run_median_step_s": [float(np.median(r["times"][warmup:])) for r, _ in runs],
            "warmup_steps_per_run": warmup, "final_loss": [r["final_loss"] for r, _ in runs],
            "process_wall_s": [round(w, 1) for _, w in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=20, help="steps dropped at the start of each run")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per side, alternating which side goes first (ABBA), pooled; cancels drift")
    p.add_argument("--quick", action="store_true", help="short smoke run (40 steps, 1 round, small dataset)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs, results)")
    # internal: the torchrun worker processes
    p.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--total-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torchrun_worker:
        return torchrun_worker(args)
    if args.quick:
        args.steps, args.warmup, args.rounds = 40, 10, 1
    world, total = 2, args.warmup + args.steps
    per_epoch = 16 if args.quick else 64  # batches per rank per epoch; longer runs take more epochs
    rows = world * args.batch_size * per_epoch

    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-"))
    env = {**os.environ, "SHIPYARD_HOME": str(tmp / "home"), "NO_COLOR": "1", "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        data = make_dataset(tmp, rows, args.dim, rows_per_shard=16 * args.batch_size, env=env)
        model_args = ["--dim", str(args.dim), "--hidden", str(args.hidden), "--lr", str(args.lr)]
        # (a) shipyard run: the job ships this directory and calls train(ctx) above.
        job = {"name": "bench-step-overhead", "entrypoint": f"{Path(__file__).name}:train", "workdir": str(HERE),
               "workers": {"count": world, "cpus": 1}, "strategy": {"kind": "ddp"},
               "dataset": {"uri": str(data), "batch_size": args.batch_size, "shuffle": False, "seed": 0,
                           "epochs": -(-total // per_epoch)},
               "config": {"dim": args.dim, "hidden": args.hidden, "lr": args.lr, "total_steps": total}}
        (tmp / "job.yaml").write_text(json.dumps(job, indent=1))  # JSON is YAML
        commands = {
            "shipyard": lambda out: [str(BIN / "shipyard"), "run", str(tmp / "job.yaml"), "--set", f"config.out={out}"],
            # (b) the baseline: this file again, under torchrun
            "torchrun": lambda out: [str(BIN / "torchrun"), f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                                     f"--master_port={free_port()}", __file__, "--torchrun-worker", "--data", str(data),
                                     "--out", str(out), "--total-steps", str(total),
                                     "--batch-size", str(args.batch_size), *model_args],
        }
        runs: dict[str, list] = {"torchrun": [], "shipyard": []}
        for i in range(args.rounds):
            for side in (("torchrun", "shipyard") if i % 2 == 0 else ("shipyard", "torchrun")):
                out = tmp / f"{side}-{i}.json"
                wall = run(commands[side](out), env, tmp / f"{side}-{i}.log")
                runs[side].append((json.loads(out.read_text()), wall))
                print(f"round {i}: {side} done in {wall:.0f}s", file=sys.stderr, flush=True)
        base, ship = (summarize(side, runs[side], args.warmup) for side in ("torchrun", "shipyard"))
        print(json.dumps(base), flush=True)
        print(json.dumps(ship), flush=True)
        ratio_median = ship["median_step_s"] / base["median_step_s"]
        losses = base["final_loss"] + ship["final_loss"]
        print(json.dumps({"bench": "step_overhead", "ratio_median": round(ratio_median, 4),
                          "ratio_p90": round(ship["p90_step_s"] / base["p90_step_s"], 4),
                          "ratio_mean": round(ship["mean_step_s"] / base["mean_step_s"], 4), "goal": 1.02,
                          "met": ratio_median <= 1.02,
                          # equal losses: both sides trained on the same batches
                          "same_batches": max(losses) - min(losses) < 1e-5}), flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
