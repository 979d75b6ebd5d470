"""Preemption: which lower-priority jobs to stop so that a higher-priority job fits.

Only the head of the queue preempts, one decision per tick: the next head decides on the next
tick, against the capacity that is then actually draining, so one burst of high-priority
submissions cannot make the scheduler stop more than is needed.

Candidates are the head's own tenant's jobs of strictly lower priority, and other tenants' jobs
only when their tenant's admin-set priority is lower than the head's tenant's (a user's job
priority is that user's to set, so it cannot be a claim on another tenant's workers), in ADMITTED (nothing lost), STARTING or RUNNING
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
from shipyard.scheduler.snapshot import Holding, JobRequest, Resources, RunningJob

PREEMPTIBLE = (Holding.ADMITTED, Holding.STARTING, Holding.RUNNING)
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def may_preempt(head: JobRequest, victim: JobRequest, tenant_priority: Mapping[str, int]) -> bool:
    if head.tenant == victim.tenant:
        return victim.priority < head.priority
    return tenant_priority.get(victim.tenant, 0) < tenant_priority.get(head.tenant, 0)


def _victim_key(r: RunningJob, tenant_priority: Mapping[str, int]) -> tuple:
    not_started = r.state is Holding.ADMITTED or r.started_at is None
    # Latest start first: negate via ordering on (not_started desc, started_at desc).
    started = r.started_at or _EPOCH
    return (tenant_priority.get(r.job.tenant, 0), r.job.priority, not not_started, -started.timestamp(), r.id)


def choose_victims(head: JobRequest, free: Mapping[str, Resources], running: Iterable[RunningJob],
                   nodes: list[str], tenant_priority: Mapping[str, int] | None = None) -> list[RunningJob] | None:
    """The jobs to preempt so ``head`` fits in ``free`` plus what they release, or ``None`` if
    even preempting every candidate would not make it fit."""
    tp = tenant_priority or {}
    candidates = sorted((r for r in running if r.state in PREEMPTIBLE and may_preempt(head, r.job, tp)),
                        key=lambda r: _victim_key(r, tp))
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
