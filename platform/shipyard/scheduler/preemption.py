"""Preemption: which lower-priority jobs to stop so that a higher-priority job fits.

Only the head of the queue preempts, one decision per tick: the next head decides on the next
tick, against the capacity that is then actually draining, so one burst of high-priority
submissions cannot make the scheduler stop more than is needed.

Candidates are jobs of strictly lower priority in ADMITTED (nothing lost), STARTING or RUNNING
(workers checkpoint on SIGTERM, then the job is requeued with its progress); RESTARTING jobs have no
worker group to checkpoint and are left alone. They are taken lowest priority first, then
least work lost (not started yet, then most recently started), until the head fits; then each
chosen victim, highest priority first, is spared again if the head still fits without it
(the Kubernetes scheduler's "reprieve"). The result is irreducible: dropping any victim leaves
the head unable to fit, and it leans on the lowest priorities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

from shipyard.scheduler.admission import Free, credit_of, give, place
from shipyard.scheduler.snapshot import JobRequest, Resources, RunningJob

PREEMPTIBLE = ("ADMITTED", "STARTING", "RUNNING")
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def _victim_key(r: RunningJob) -> tuple:
    not_started = r.state == "ADMITTED" or r.started_at is None
    # Latest start first: negate via ordering on (not_started desc, started_at desc).
    started = r.started_at or _EPOCH
    return (r.job.priority, not not_started, -started.timestamp(), r.id)


def choose_victims(head: JobRequest, free: Mapping[str, Resources], running: Iterable[RunningJob],
                   nodes: list[str]) -> list[RunningJob] | None:
    """The jobs to preempt so ``head`` fits in ``free`` plus what they release, or ``None`` if
    even preempting every candidate would not make it fit."""
    candidates = sorted((r for r in running if r.state in PREEMPTIBLE and r.job.priority < head.priority),
                        key=_victim_key)
    trial: Free = dict(free)
    chosen: list[RunningJob] = []
    for r in candidates:
        trial = give(trial, credit_of(r, nodes))
        chosen.append(r)
        if place(head, trial) is not None:
            break
    else:
        return None
    for r in reversed(list(chosen)):
        without = give(trial, {n: res * -1 for n, res in credit_of(r, nodes).items()})
        if place(head, without) is not None:
            trial = without
            chosen.remove(r)
    return chosen
