"""What the store returns: frozen plain records, detached from any database session.

Sessions live for one short transaction, so ORM objects would be expired or unsafe to share
between the API's threads and the scheduler loop; these records are neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from shipyard.run.records import AttemptKind
from shipyard.store import models
from shipyard.store.states import JobState

T = TypeVar("T")


@dataclass(frozen=True)
class Tenant:
    name: str
    max_gpus: float | None = None
    max_cpus: float | None = None
    max_running_jobs: int | None = None
    created_at: datetime | None = None
    storage_roots: tuple[tuple[str, bool], ...] = ()  # (uri, writable) granted by an admin
    priority: int = 0  # admin-set; a job preempts another tenant's only from a higher one

    @classmethod
    def of(cls, row: models.Tenant) -> "Tenant":
        roots = tuple((r["uri"], bool(r.get("writable", True))) for r in (row.storage_roots or []))
        return cls(row.name, row.max_gpus, row.max_cpus, row.max_running_jobs, row.created_at, roots,
                   row.priority or 0)


@dataclass(frozen=True)
class Token:
    """A token's record; the secret itself is returned only once, by ``create_token``."""

    id: int
    tenant: str
    admin: bool
    label: str | None
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None  # None: never expires

    @classmethod
    def of(cls, row: models.Token) -> "Token":
        return cls(row.id, row.tenant, row.admin, row.label, row.created_at, row.revoked_at, row.expires_at)


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    name: str
    spec: dict[str, Any] = field(repr=False)
    priority: int
    state: JobState
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    backend_handle: str | None
    cause: str | None
    message: str | None
    last_step: int | None
    progress: float | None
    seq: int = field(repr=False)
    checkpoint: str | None = None
    total_steps: int | None = None
    runs: int = 0  # backend submissions so far; the next run is number runs + 1
    requeues: int = 0  # PREEMPTED -> QUEUED moves so far (preempted or lost runs)

    @classmethod
    def of(cls, row: models.Job) -> "Job":
        return cls(row.id, row.tenant, row.name, row.spec, row.priority, JobState(row.state),
                   row.submitted_at, row.started_at, row.ended_at, row.updated_at, row.backend_handle,
                   row.cause, row.message, row.last_step, row.progress, row.seq, row.checkpoint, row.total_steps,
                   row.runs or 0, row.requeues or 0)


@dataclass(frozen=True)
class Attempt:
    job_id: str
    number: int
    started_at: datetime
    ended_at: datetime | None
    cause: str | None
    last_step: int | None
    steps_lost: int | None
    submission: str | None = None
    run_number: int | None = None
    kind: AttemptKind | None = None
    start_step: int | None = None
    committed_step: int | None = None
    recovery_s: float | None = None

    @classmethod
    def of(cls, row: models.Attempt) -> "Attempt":
        return cls(row.job_id, row.number, row.started_at, row.ended_at, row.cause, row.last_step, row.steps_lost,
                   row.submission, row.run_number, AttemptKind(row.kind) if row.kind else None, row.start_step,
                   row.committed_step, row.recovery_s)


# An event of this kind records a fact rather than a message: its text is exactly the id of the
# job whose admission preempted this one (kept in the events table so no migration adds a column;
# read back by kind, never parsed out of a state event's text).
PREEMPTED_BY = "preempted_by"


@dataclass(frozen=True)
class Event:
    job_id: str
    at: datetime
    kind: str
    message: str

    @classmethod
    def of(cls, row: models.Event) -> "Event":
        return cls(row.job_id, row.at, row.kind, row.message)


@dataclass(frozen=True)
class MetricPoint:
    job_id: str
    step: int
    at: datetime
    values: dict[str, float]

    @classmethod
    def of(cls, row: models.Metric) -> "MetricPoint":
        return cls(row.job_id, row.step, row.at, row.values)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back to get the next (``None``: last page)."""

    items: list[T]
    next_cursor: str | None
