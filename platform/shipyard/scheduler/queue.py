"""Queue order: tenant priority, then each tenant's own order in the slots its submissions hold.

Fair play between tenants: a job's ``priority`` is the user's to set, so it may reorder only the
user's own tenant's jobs. Each tenant's jobs hold *slots*, the submission times of its queued
jobs; the tenant's jobs, sorted by priority (higher first) then age, fill its slots oldest
first. Across tenants the queue is then ordered by the admin-set tenant priority (higher first)
and the slot time (older first). So a tenant that marks a new job priority 1000 moves it ahead of
its own older jobs, never ahead of another tenant's job that was submitted earlier; only an
admin's tenant priority puts one tenant's work before another's.

A preempted job is requeued with its original submission time, so it goes back into the slot it
held. The store's insertion sequence breaks ties between jobs submitted in the same instant, so
the order is total and stable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from shipyard.scheduler.snapshot import JobRequest


def own_order(job: JobRequest) -> tuple:
    """A tenant's own order: priority first (higher first), then submission time (older first)."""
    return (-job.priority, job.submitted_at, job.seq, job.id)


def _age(job: JobRequest) -> tuple:
    return (job.submitted_at, job.seq, job.id)


def order(jobs: Iterable[JobRequest], tenant_priority: Mapping[str, int] | None = None) -> list[JobRequest]:
    tenant_priority = tenant_priority or {}
    by_tenant: dict[str, list[JobRequest]] = defaultdict(list)
    for j in jobs:
        by_tenant[j.tenant].append(j)
    keyed = []
    for tenant, mine in by_tenant.items():
        slots = sorted(_age(j) for j in mine)
        for slot, j in zip(slots, sorted(mine, key=own_order)):
            keyed.append(((-tenant_priority.get(tenant, 0), *slot), j))
    return [j for _, j in sorted(keyed, key=lambda kj: kj[0])]
