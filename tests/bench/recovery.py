"""Recovery benchmark: SIGKILL a worker process 5 times; how long until training runs again, and why.

Runs the record-ids test job (2 CPU workers, gloo, checkpoints every 10 steps, uploaded in the
background) through the same launcher as `shipyard run`, on a private local Ray. The job SIGKILLs one rank's process at 5 steps
that are not checkpoint steps (once each), writing the kill time first. For each recovery it prints
one JSON line with the seconds from the kill to the first step of the next attempt and the parts:

  detect      kill -> Ray Train's controller reports the failed attempt (health-check polling)
  group_start -> every rank has joined the next process-group generation: Ray Train starts one
                 replacement worker (actor process, imports, its train context) while the
                 surviving rank waits in its own process (runtime/regroup.py)
  restore     -> rank 0 has loaded the checkpoint (process groups, strategy, DCP load)
  first_step  -> its first training step is done (data stream reopened at the saved position)

and the steps lost. A summary line gives medians and the goal (<= 10 s per recovery). The job runs
twice: with ``restart_in_place`` (the default: only the killed rank gets a new process) and, as
the baseline, with every rank restarted (Ray Train's own behaviour); a last line gives the ratio.

    .venv/bin/python tests/bench/recovery.py [--health-check-interval-s 2.0] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "integration" / "jobs" / "record_ids" / "job.yaml"
KILLS = [[15, 1], [45, 0], [75, 1], [105, 0], [135, 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--health-check-interval-s", type=float, default=None,
                    help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the controller (shipyard default: 0.5; Ray: 2.0)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="only the default (restart_in_place); without it, a second run restarts every rank")
    args = ap.parse_args()
    if args.health_check_interval_s is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_interval_s)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from shipyard.config import enable_ray_token_auth

    enable_ray_token_auth()
    from shipyard.runtime.launcher import launch
    from shipyard.spec import load_spec

    work = Path(tempfile.mkdtemp(prefix="shipyard-recovery-"))
    exe = Path(sys.executable).parent / "shipyard"
    subprocess.run([str(exe), "data", "shard", "sklearn:digits:train", str(work / "digits"), "--rows-per-shard", "300"],
                   check=True, capture_output=True)
    medians = {}
    for mode, in_place in (("in_place", True), ("whole_group", False)):
        if mode == "whole_group" and args.skip_baseline:
            continue
        medians[mode] = run(launch, load_spec, work, mode, in_place)
    if len(medians) == 2:
        print(json.dumps({"bench": "recovery", "ratio": True, "in_place_vs_whole_group":
                          round(medians["in_place"] / medians["whole_group"], 3)}), flush=True)


def run(launch, load_spec, work: Path, mode: str, in_place: bool) -> float:
    """One run with 5 kills; prints a row per recovery and a summary; returns the median seconds."""
    out, ck = work / f"out-{mode}", work / f"ck-{mode}"
    out.mkdir()
    spec = load_spec(JOB, [f"dataset.uri={work / 'digits'}", "dataset.epochs=8", f"checkpoint.uri={ck}",
                           f"config.out={out}", f"config.kills={KILLS}", "max_failures=5",
                           f"restart_in_place={str(in_place).lower()}"])
    result = launch(spec)
    if not result.ok:
        sys.exit(f"the job failed ({mode}): {result.error}")
    attempts = result.snapshot.attempts
    rows = []
    for (step, rank), failed, nxt in zip(KILLS, attempts, attempts[1:]):
        killed_at = float((out / f"killed-{step}").read_text())
        parts = {
            "detect": failed.end - killed_at,
            "group_start": nxt.entered - failed.end,
            "restore": nxt.restored_at - nxt.entered,
            "first_step": nxt.first_step_at - nxt.restored_at,
        }
        row = {"bench": "recovery", "mode": mode, "kill_step": step, "rank": rank,
               "seconds": round(nxt.first_step_at - killed_at, 2),
               **{k: round(v, 2) for k, v in parts.items()}, "steps_lost": failed.steps_lost,
               "resumed_from": nxt.start_step}
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in ("seconds", "detect", "group_start",
                                                                          "restore", "first_step")}
    print(json.dumps({"bench": "recovery", "mode": mode, "summary": True, "recoveries": len(rows), "median": med,
                      "max_seconds": max(r["seconds"] for r in rows), "goal_s": 10.0,
                      "meets_goal": max(r["seconds"] for r in rows) <= 10.0,
                      "dominant": max(("detect", "group_start", "restore", "first_step"), key=lambda k: med[k]),
                      "health_check_interval_s": float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.5)),  # launcher default
                      "total_run_s": round(result.seconds, 1)}), flush=True)
    return med["seconds"]


if __name__ == "__main__":
    t0 = time.time()
    main()
