"""Scheduling decision time and admissions per second for 10,000 queued jobs across 50 tenants.

One call of :func:`shipyard.scheduler.decide` is one tick of the scheduler loop: order, quotas,
gang placement on 200 nodes (8 GPUs, 64 CPUs each), backfill behind a reserved head, preemption.
The queue is random but seeded: priorities 0-9, 1-8 workers of 0-1 GPU and 1-8 CPUs, tenants with
quotas; 300 jobs are already running. Each repetition decides on a fresh snapshot; the figure is
the median. Goal: >= 1,000 admissions/s (Kueue's own CI reports about 43/s).

    .venv/bin/python tests/bench/scheduler.py [--jobs 10000] [--tenants 50] [--nodes 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import datetime, timedelta, timezone

from shipyard.scheduler import decide
from shipyard.scheduler.snapshot import JobRequest, Node, Quota, Resources, RunningJob, Snapshot


def snapshot(jobs: int, tenants: int, nodes: int, seed: int) -> Snapshot:
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    names = [f"tenant-{i}" for i in range(tenants)]

    def request(i: int) -> JobRequest:
        gpus = rng.choice([0, 0, 1, 1, 1, 0.5])
        return JobRequest(f"job-{i}", rng.choice(names), rng.randrange(10), t0 + timedelta(seconds=i),
                          rng.randint(1, 8), Resources(rng.randint(1, 8), gpus, 0), seq=i)

    running = tuple(RunningJob(request(jobs + i), "RUNNING") for i in range(300))
    cluster = [Node(f"node-{n}", Resources(64, 8, 0)) for n in range(nodes)]
    # The running jobs hold capacity: take it off the nodes in order.
    free = [n.free for n in cluster]
    for r in running:
        for _ in range(r.job.workers):
            k = next((k for k, f in enumerate(free) if r.job.per_worker.fits_in(f)), None)
            if k is not None:
                free[k] = free[k] - r.job.per_worker
    nodes_ = tuple(Node(c.name, f, c.free) for c, f in zip(cluster, free))
    quotas = {t: Quota(max_gpus=rng.choice([16, 32, 64]), max_cpus=512, max_running_jobs=rng.choice([10, 20, 50]))
              for t in names}
    return Snapshot(queued=tuple(request(i) for i in range(jobs)), running=running, nodes=nodes_, quotas=quotas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    times, admitted, preempted = [], [], []
    for rep in range(args.reps):
        snap = snapshot(args.jobs, args.tenants, args.nodes, seed=rep)
        t = time.perf_counter()
        d = decide(snap)
        times.append(time.perf_counter() - t)
        admitted.append(len(d.admit))
        preempted.append(len(d.preempt))
        print(json.dumps({"bench": "scheduler", "rep": rep, "decide_s": round(times[-1], 3),
                          "admitted": admitted[-1], "preempted": preempted[-1],
                          "waiting_with_reason": len(d.reasons)}), flush=True)
    med_t, med_a = statistics.median(times), statistics.median(admitted)
    print(json.dumps({"bench": "scheduler", "summary": True, "queued": args.jobs, "tenants": args.tenants,
                      "nodes": args.nodes, "median_decide_s": round(med_t, 3), "median_admitted": med_a,
                      "admissions_per_s": round(med_a / med_t), "goal": ">= 1000",
                      "meets_goal": med_a / med_t >= 1000}))


if __name__ == "__main__":
    main()
