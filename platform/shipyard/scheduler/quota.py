"""Per-tenant quotas: GPUs, CPUs and jobs holding resources at once.

Usage counts every job that holds resources (CPUs rounded up per worker, :func:`charged`) (ADMITTED, RUNNING, RESTARTING and PREEMPTED while
it drains), since those are the workers the tenant occupies. A quota caps admissions; it never
stops running jobs, and a quota-blocked job neither reserves capacity nor preempts anyone:
waiting for capacity would not help it, only the tenant's own jobs ending would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from shipyard.scheduler.snapshot import EPS, JobRequest, Quota, Resources, RunningJob


def fmt(x: float) -> str:
    return str(int(x)) if abs(x - round(x)) < EPS else f"{x:.2f}".rstrip("0")


@dataclass
class Usage:
    gpus: float = 0.0
    cpus: float = 0.0
    jobs: int = 0

    def add(self, job: JobRequest) -> None:
        d = charged(job)
        self.gpus += d.gpus
        self.cpus += d.cpus
        self.jobs += 1


def charged(job: JobRequest) -> Resources:
    """What a job counts against its tenant's quota: each worker's CPUs rounded up to a whole CPU,
    so 4,096 workers of a millionth of a CPU count as 4,096 CPUs, not 0.004."""
    per = job.per_worker
    return Resources(math.ceil(per.cpus - EPS), per.gpus, per.memory) * job.workers


def usage_by_tenant(running: Iterable[RunningJob]) -> dict[str, Usage]:
    out: dict[str, Usage] = {}
    for r in running:
        out.setdefault(r.job.tenant, Usage()).add(r.job)
    return out


def blocked(job: JobRequest, usage: Usage | None, quota: Quota | None) -> str | None:
    """Why the tenant's quota keeps ``job`` waiting, or ``None`` if it does not."""
    if quota is None:
        return None
    u, d, t = usage or Usage(), charged(job), job.tenant
    for label, need, used, limit in (("GPUs", d.gpus, u.gpus, quota.max_gpus),
                                     ("CPUs", d.cpus, u.cpus, quota.max_cpus)):
        if limit is None or need <= EPS:
            continue
        if need > limit + EPS:
            return f"quota: job needs {fmt(need)} {label}, more than tenant {t}'s limit of {fmt(limit)}"
        if used + need > limit + EPS:
            return f"quota: tenant {t} uses {fmt(used)}/{fmt(limit)} {label}, job needs {fmt(need)}"
    if quota.max_running_jobs is not None and u.jobs + 1 > quota.max_running_jobs:
        return f"quota: tenant {t} runs {u.jobs}/{quota.max_running_jobs} jobs"
    return None
