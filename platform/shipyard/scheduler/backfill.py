"""Backfill without starving the head: a reservation for the first job that cannot fit.

Policy: **reservation** (EASY-style, one reservation for the head of the queue), not aging.

- The head is the first job in queue order that its quota allows and that could fit on an
  empty cluster, but does not fit now. The scheduler picks the nodes where the head will run
  (its *plan*) and holds, on those nodes, all the free capacity the plan needs there. Jobs
  behind the head may start only on what is left ("backfill").
- Why that cannot starve the head: capacity freed on the planned nodes is never handed to a
  job behind the head, so those nodes fill up with the head's share and nothing else; once
  the jobs that were running there when the head got stuck end, the head fits. Backfilled
  jobs only ever use capacity the head could not have used.
- The plan is stable from tick to tick, so the head's share keeps growing instead of moving:
  the placement on what will be free once PREEMPTED (draining) jobs are gone if that fits
  (this is how a preempting head keeps the capacity it preempted for), else the placement on
  the nodes' *total* capacity, else (totals unknown) the free capacity first come first served.
- Why not aging: with no runtime estimates (a JobSpec has no time limit), aging only bounds the
  head's wait by a tunable timeout after which it blocks everyone anyway; before that, the head
  can wait behind an unbounded stream of small jobs. A reservation costs idle capacity only on
  the head's nodes and only for as long as the head waits, and needs no tuning.
- Why one reservation, not one per waiting job (conservative backfill): every later job becomes
  the head in turn, and per-job reservations without runtimes would fence off most of the
  cluster for jobs that cannot start yet.
"""

from __future__ import annotations

from collections.abc import Mapping

from shipyard.scheduler.admission import Free, give, place
from shipyard.scheduler.snapshot import JobRequest, Resources


def reservation(head: JobRequest, free: Mapping[str, Resources], releasing: Mapping[str, Resources],
                node_totals: Mapping[str, Resources] | None) -> Free:
    """Per node, the free capacity held for ``head``. ``releasing``: what draining (and newly
    preempted) jobs give back per node once they stop."""
    plan = place(head, give(dict(free), releasing))
    if plan is None and node_totals is not None:
        plan = place(head, node_totals)
    if plan is None:
        return _first_come(head.demand, free)
    return {n: free[n].min(head.per_worker * k) for n, k in plan.items() if n in free}


def _first_come(need: Resources, free: Mapping[str, Resources]) -> Free:
    held: Free = {}
    left = need
    for n in sorted(free):
        held[n] = free[n].min(left)
        left = (left - held[n]).clamp()
    return held
