"""The tables, as SQLAlchemy 2 typed models. The schema itself is owned by the Alembic
migrations in ``migrations/versions``; these classes must describe the head revision (a test
compares them with the migrated database).

Times are stored as UTC and always read back timezone-aware (SQLite drops the zone, so
:class:`UTCDateTime` puts it back). Jobs have an integer ``seq`` besides their public string
``id``: it gives a total order (queue tie-break, keyset pagination) that timestamps alone
cannot, because two jobs may be submitted in the same microsecond.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Tenant(Base):
    """A team sharing the service. A ``None`` quota means unlimited."""

    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    max_gpus: Mapped[float | None] = mapped_column(Float)
    max_cpus: Mapped[float | None] = mapped_column(Float)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]
    # Migration 0003: extra storage roots ([{"uri", "writable"}]) and the admin-set priority.
    storage_roots: Mapped[list | None] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Token(Base):
    """A bearer token, stored as its SHA-256 only (tokens are 256 random bits, so a slow
    password hash would add latency to every request without adding safety)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # migration 0006; None: never expires


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]]
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    submitted_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    backend_handle: Mapped[str | None] = mapped_column(String(200))
    cause: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[float | None] = mapped_column(Float)
    checkpoint: Mapped[str | None] = mapped_column(Text)  # latest committed checkpoint the driver reported
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))  # migration 0003
    runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # migration 0005: submissions so far
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # migration 0005
    # Migration 0005: how the driver of run ``outcome_run`` said it ended (runtime.report.RunOutcome).
    outcome: Mapped[str | None] = mapped_column(String(16))
    outcome_run: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_idempotency"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_name", "name"),
    )


class Attempt(Base):
    """One run of a job's worker group: a restart or a requeue after preemption starts a new one."""

    __tablename__ = "attempts"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    cause: Mapped[str | None] = mapped_column(String(64))
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    steps_lost: Mapped[int | None] = mapped_column(BigInteger)
    # From the driver's report (migration 0002): which run and which of its attempts this is.
    submission: Mapped[str | None] = mapped_column(String(200))
    run_number: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str | None] = mapped_column(String(16))
    start_step: Mapped[int | None] = mapped_column(BigInteger)
    committed_step: Mapped[int | None] = mapped_column(BigInteger)
    recovery_s: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
                      UniqueConstraint("job_id", "submission", "run_number", name="uq_attempts_run"))


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class Metric(Base):
    """One report from a job: ``values`` maps metric names to numbers at ``step``."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime]
    values: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_metrics_job_step", "job_id", "step"),)
