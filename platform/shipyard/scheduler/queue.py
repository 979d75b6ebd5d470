"""Queue order: priority first (higher first), then submission time (older first).

A preempted job is requeued with its original submission time, so it goes back ahead of
everything of its priority that was submitted after it. The store's insertion sequence breaks
ties between jobs submitted in the same instant, so the order is total and stable.
"""

from __future__ import annotations

from collections.abc import Iterable

from shipyard.scheduler.snapshot import JobRequest


def queue_key(job: JobRequest) -> tuple:
    return (-job.priority, job.submitted_at, job.seq, job.id)


def order(jobs: Iterable[JobRequest]) -> list[JobRequest]:
    return sorted(jobs, key=queue_key)
