"""64 MB float32 all-reduce across 2 ranks: Horovod over Gloo against torch.distributed over Gloo.

Where it runs: two Ray Train V2 ``TorchTrainer`` workers, i.e. the processes a shipyard job
runs in, with Horovod started by ``shipyard.parallel.horovod.init()`` exactly as
``strategy: horovod`` does. So the Horovod figure includes whatever our way of starting Horovod
inside Ray Train costs per call (nothing, by design: after init both libraries talk Gloo over TCP
directly). Both libraries are measured in the same two processes, on the same tensor, in one run.

What is timed: one in-place all-reduce (sum) of a 16 Mi-element float32 tensor (64 MiB), from
the call until the result is there (``hvd.allreduce_`` returns once done; ``dist.all_reduce``
blocks too). Before each repetition both ranks meet in a barrier, so a repetition does not
include the other rank being late. Repetitions alternate torch, horovod, torch, ... so a drift
of a busy machine's speed lands on both sides; the first ``--warmup`` of each are dropped.
Rank 0's times are reported; the median is the figure, p90 shows the noise.

Output: JSON lines, one per library, then ``{"ratio_horovod_over_torch": ...}`` (<1: Horovod faster).

Then the digits job (jobs/digits, 2 workers) runs once with ``strategy: ddp`` and once with
``strategy: horovod`` through shipyard's launcher; the step time is the wall time from the first
finished step to the last, over the steps in between (start-up and the restore excluded), and a
last line gives the ratio horovod/ddp.

Run: python tests/bench/allreduce.py [--reps N] [--warmup W] [--mb 64] [--digits-epochs 10]
     (joins RAY_ADDRESS when set, else starts a private local Ray.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def worker(config: dict) -> None:
    import torch
    import torch.distributed as dist

    import horovod.torch as hvd
    import ray.train
    from shipyard.parallel import horovod

    torch.set_num_threads(1)  # two ranks share the machine; reductions run on Gloo's threads anyway
    t0 = time.perf_counter()
    horovod.init()
    init_s = time.perf_counter() - t0
    n = config["mb"] * 2**20 // 4
    tensor = torch.ones(n, dtype=torch.float32)
    times: dict[str, list[float]] = {"torch_gloo": [], "horovod_gloo": []}
    ok = True
    for _ in range(config["warmup"] + config["reps"]):
        for name in times:
            tensor.fill_(1.0)
            dist.barrier()
            t = time.perf_counter()
            if name == "torch_gloo":
                dist.all_reduce(tensor)
            else:
                hvd.allreduce_(tensor, op=hvd.Sum, name="bench")
            times[name].append(time.perf_counter() - t)
            ok = ok and bool(tensor[0] == dist.get_world_size() and tensor[-1] == dist.get_world_size())
    horovod.shutdown()
    if dist.get_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"times": {k: v[config["warmup"]:] for k, v in times.items()},
                       "init_s": init_s, "correct": ok}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--digits-epochs", type=int, default=10, help="0 skips the digits comparison")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:  # Ray Train V2 watches its controller through the dashboard's State API: keep it on
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        TorchTrainer(worker, train_loop_config={**vars(args), "out": out},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="bench-allreduce", storage_path=os.path.join(tmp, "ray"))).fit()
        with open(out) as f:
            result = json.load(f)
    ray.shutdown()

    medians = {}
    for name, times in result["times"].items():
        times = sorted(times)
        medians[name] = statistics.median(times)
        print(json.dumps({"bench": "allreduce", "impl": name, "ranks": 2, "mb": args.mb, "dtype": "float32",
                          "reps": len(times), "median_s": round(medians[name], 4),
                          "p90_s": round(times[int(0.9 * (len(times) - 1))], 4),
                          "algbw_gib_per_s": round(args.mb / 1024 / medians[name], 3)}))
    print(json.dumps({"ratio_horovod_over_torch": round(medians["horovod_gloo"] / medians["torch_gloo"], 3),
                      "horovod_init_s": round(result["init_s"], 3), "results_correct": result["correct"]}))
    if not result["correct"]:
        sys.exit(1)
    if args.digits_epochs:
        digits_step_times(args.digits_epochs)


def digits_step_times(epochs: int) -> None:
    import subprocess
    from pathlib import Path

    from shipyard.runtime.launcher import launch
    from shipyard.spec import load_spec

    repo = Path(__file__).resolve().parents[2]
    exe = Path(sys.executable).parent / "shipyard"
    step_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "test"):
            subprocess.run([str(exe), "data", "shard", f"sklearn:digits:{split}", f"{tmp}/{split}"],
                           check=True, capture_output=True)
        for kind in ("ddp", "horovod"):
            spec = load_spec(repo / "jobs" / "digits" / "job.yaml", [
                f"strategy.kind={kind}", f"dataset.uri={tmp}/train", f"dataset.eval_uri={tmp}/test",
                f"dataset.epochs={epochs}", f"checkpoint.uri={tmp}/ck-{kind}", "checkpoint.every_steps=1000"])
            result = launch(spec)
            if not result.ok:
                sys.exit(f"digits with {kind} failed: {result.error}")
            snap, attempt = result.snapshot, result.snapshot.attempts[-1]
            steps = attempt.last_step - attempt.start_step - 1
            step_s[kind] = (attempt.last_step_at - attempt.first_step_at) / steps
            print(json.dumps({"bench": "digits_step", "strategy": kind, "steps": steps + 1,
                              "step_ms": round(step_s[kind] * 1000, 3),
                              "accuracy": snap.metrics.get("accuracy")}), flush=True)
    print(json.dumps({"ratio_digits_step_horovod_over_ddp": round(step_s["horovod"] / step_s["ddp"], 3)}))


if __name__ == "__main__":
    main()
