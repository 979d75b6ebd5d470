"""Response bodies (they make the OpenAPI document say what each route returns)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from shipyard.run.records import AttemptKind, RunOutcome


class Created(BaseModel):
    id: str
    state: str


class JobSummary(BaseModel):
    id: str
    name: str
    tenant: str
    priority: int
    state: str
    submitted_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    cause: str | None = None
    message: str | None = None
    step: int | None = None
    total_steps: int | None = None
    progress: float | None = None
    waiting: str | None = None  # why a queued job is not running yet (the scheduler's reason)

    @classmethod
    def of(cls, job, waiting: str | None = None) -> "JobSummary":
        return cls(id=job.id, name=job.name, tenant=job.tenant, priority=job.priority, state=job.state.value,
                   submitted_at=job.submitted_at, started_at=job.started_at, ended_at=job.ended_at, cause=job.cause,
                   message=job.message, step=job.last_step, total_steps=job.total_steps, progress=job.progress,
                   waiting=waiting)


class AttemptOut(BaseModel):
    number: int  # counted over the job's runs
    started_at: datetime
    ended_at: datetime | None = None
    kind: AttemptKind | None = None
    cause: str | None = None
    start_step: int | None = None
    last_step: int | None = None
    committed_step: int | None = None
    steps_lost: int | None = None
    recovery_s: float | None = None
    run: str | None = None  # the backend's handle of the run it belongs to
    run_number: int | None = None  # which of the job's runs (1 = the first submission to a backend)

    @classmethod
    def of(cls, a, run_number: int | None) -> "AttemptOut":
        return cls(number=a.number, started_at=a.started_at, ended_at=a.ended_at, kind=a.kind, cause=a.cause,
                   start_step=a.start_step, last_step=a.last_step, committed_step=a.committed_step,
                   steps_lost=a.steps_lost, recovery_s=a.recovery_s, run=a.submission, run_number=run_number)


class RunOut(BaseModel):
    """One submission of the job to a backend, with its attempts."""

    number: int
    handle: str
    attempts: list[int]  # the job-wide numbers of its attempts
    first_step: int | None = None  # the step its first attempt started from
    last_step: int | None = None
    outcome: RunOutcome | None = None  # the driver's word, for the job's current run
    ended: AttemptKind | None = None  # how its last attempt ended (lost: it vanished with its head)


class CheckpointOut(BaseModel):
    step: int
    uri: str
    committed: bool
    epoch: int | None = None
    time: float | None = None
    bytes: int | None = None


class EventOut(BaseModel):
    at: datetime
    kind: str
    message: str


class JobDetail(JobSummary):
    spec: dict[str, Any]
    backend_handle: str | None = None
    attempts: list[AttemptOut] = []
    runs: list[RunOut] = []
    metrics: dict[str, float | None] = {}
    checkpoint: str | None = None
    checkpoints: list[CheckpointOut] = []
    checkpoints_error: str | None = None
    events: list[EventOut] = []
    preempted_by: str | None = None  # the job whose admission last preempted this one (None: never preempted)


class JobList(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None = None


class MetricPointOut(BaseModel):
    step: int
    at: datetime
    values: dict[str, float | None]


class MetricsOut(BaseModel):
    job_id: str
    points: list[MetricPointOut]


class ReportAck(BaseModel):
    ok: bool = True
    state: str
