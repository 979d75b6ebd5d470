"""The job store: jobs, their state transitions, attempts and events.

Every method is one short transaction on a connection of its own, so the API's request threads
and the scheduler loop can share one :class:`Store`. Writes return only after their commit: a
job id handed to a user is on disk (``add_job``s running at the same time share one commit, see
:mod:`shipyard.store.submits`). State changes are compare-and-set (``expected`` state in,
``UPDATE ... WHERE state = :expected``), so two writers cannot both act on one state: the
second gets :class:`StaleTransition` and must re-read. Tenants and tokens are in
:mod:`shipyard.store.tenancy`, metrics in :mod:`shipyard.store.metrics` (both mixed in here).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from shipyard.errors import UserError
from shipyard.store import migrate, models
from shipyard.store.engine import WRITE, default_url, make_engine
from shipyard.store.errors import JobNotFound, StoreError
from shipyard.store.records import Attempt, Event, Job, Page
from shipyard.store.states import ACTIVE, TERMINAL, JobState, StaleTransition, check_transition, parse_state
from shipyard.store.metrics import MetricsMixin
from shipyard.store.runs import RunsMixin
from shipyard.store.submits import GroupCommit, Submission
from shipyard.store.tenancy import TenancyMixin, TokenCache

MAX_PAGE = 1000
_UNSET: Any = object()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Store(TenancyMixin, MetricsMixin, RunsMixin):
    """Open with :meth:`open`; thread-safe; close with :meth:`close` (or use as a context manager)."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        self._writer = self.engine.execution_options(**{WRITE: True})
        self._submits = GroupCommit(self._writer)
        self._tokens = TokenCache()
        self.url = self.engine.url.render_as_string(hide_password=True)

    @classmethod
    def open(cls, url: str | None = None, *, data_dir: str | Path | None = None) -> "Store":
        """Connect and migrate to the newest schema. ``url`` defaults to a SQLite file in
        ``data_dir`` (default: ``$SHIPYARD_HOME``, i.e. ``~/.shipyard``)."""
        if url is None:
            if data_dir is None:
                from shipyard.config import Settings
                data_dir = Settings.from_env().home
            url = default_url(data_dir)
        store = cls(url)
        try:
            migrate.upgrade(store._writer)
        except OperationalError as e:
            store.close()
            raise StoreError(f"database {store.url}: cannot connect or migrate: {e.orig or e}") from None
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self._submits.close()
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    # -- jobs -------------------------------------------------------------------------------

    def add_job(self, tenant: str, spec: Any, *, priority: int = 0, now: datetime | None = None) -> Job:
        """Persist a QUEUED job; returns after the commit. ``spec``: a JobSpec or its JSON dict."""
        return self.submit_job(tenant, spec, priority=priority, now=now).result()

    def submit_job(self, tenant: str, spec: Any, *, priority: int = 0, now: datetime | None = None,
                   idempotency_key: str | None = None) -> Future:
        """:meth:`add_job` without waiting: a future holding the :class:`Job` once it is committed
        (an event loop awaits it with ``asyncio.wrap_future``). Concurrent submissions share one
        transaction (:mod:`shipyard.store.submits`). A tenant's second submit with the same
        ``idempotency_key`` resolves to the job the first one created (nothing new is stored)."""
        spec_json = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
        name = spec_json.get("name")
        if not isinstance(name, str) or not name:
            raise UserError("job spec has no name")
        return self._submits.submit(Submission(tenant, name, spec_json, int(priority), now or utcnow(),
                                               idempotency_key))

    def get_job(self, job_id: str, *, tenant: str | None = None) -> Job:
        """The job, or :class:`JobNotFound`; with ``tenant``, another tenant's job is "not found"
        too, so ids do not leak across tenants."""
        with self._read() as s:
            row = s.scalar(select(models.Job).where(models.Job.id == job_id))
        if row is None or (tenant is not None and row.tenant != tenant):
            raise JobNotFound(job_id)
        return Job.of(row)

    def list_jobs(self, *, tenant: str | None = None, states: Iterable[str | JobState] | None = None,
                  name: str | None = None, limit: int = 50, cursor: str | None = None) -> Page[Job]:
        """Newest first. Keyset pagination: a page is stable while jobs are being added."""
        if not 1 <= limit <= MAX_PAGE:
            raise UserError(f"limit: got {limit}; must be between 1 and {MAX_PAGE}")
        q = select(models.Job).order_by(models.Job.seq.desc()).limit(limit + 1)
        if tenant is not None:
            q = q.where(models.Job.tenant == tenant)
        if states is not None:
            q = q.where(models.Job.state.in_([parse_state(x).value for x in states]))
        if name is not None:
            q = q.where(models.Job.name == name)
        if cursor is not None:
            if not cursor.isdigit():
                raise UserError(f"cursor: got {cursor!r}; pass back the next_cursor of the previous page")
            q = q.where(models.Job.seq < int(cursor))
        with self._read() as s:
            rows = list(s.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([Job.of(r) for r in rows], str(rows[-1].seq) if more else None)

    def count_jobs(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included): the server's gauges."""
        with self._read() as s:
            rows = s.execute(select(models.Job.state, func.count()).group_by(models.Job.state)).all()
        return {**{x.value: 0 for x in JobState}, **{state: n for state, n in rows}}

    def active_jobs(self) -> list[Job]:
        """Every job that is not finished, in submission order: what the scheduler loop snapshots."""
        q = select(models.Job).where(models.Job.state.in_([x.value for x in ACTIVE])).order_by(models.Job.seq)
        with self._read() as s:
            return [Job.of(r) for r in s.scalars(q)]

    def recently_ended_jobs(self, within_s: float, limit: int = 500) -> list[Job]:
        """Finished jobs that ended in the last ``within_s`` seconds, newest first."""
        since = utcnow() - timedelta(seconds=within_s)
        q = (select(models.Job).where(models.Job.state.in_([x.value for x in TERMINAL]), models.Job.ended_at >= since)
             .order_by(models.Job.seq.desc()).limit(limit))
        with self._read() as s:
            return [Job.of(r) for r in s.scalars(q)]

    def transition(self, job_id: str, expected: JobState, target: JobState, *, cause: str | None = None,
                   message: str | None = None, backend_handle: str | None = _UNSET,
                   now: datetime | None = None) -> Job:
        """Compare-and-set ``expected -> target``; records a ``state`` event in the same commit.

        Raises :class:`IllegalTransition` if the machine forbids the edge, :class:`StaleTransition`
        if the job is no longer in ``expected``, :class:`JobNotFound` if there is no such job.
        RUNNING sets ``started_at`` the first time; a terminal state sets ``ended_at``; requeueing
        (-> QUEUED) drops the backend handle of the run that was preempted. ``cause`` and
        ``message`` say why the job is in ``target``, so they replace the job's, None included: a
        job that finishes does not keep saying "running as ...", one restarting says nothing of
        the run it had.
        """
        expected, target = parse_state(expected), parse_state(target)
        check_transition(expected, target, job_id)
        now = now or utcnow()
        values: dict[str, Any] = {"state": target.value, "updated_at": now, "cause": cause, "message": message}
        if backend_handle is not _UNSET:
            values["backend_handle"] = backend_handle
        if target is JobState.RUNNING:
            values["started_at"] = func.coalesce(models.Job.started_at, now)
        if target.terminal:
            values["ended_at"] = now
        if target is JobState.QUEUED:
            values["backend_handle"] = None
        with self._write() as s:
            res = s.execute(update(models.Job).where(models.Job.id == job_id, models.Job.state == expected.value)
                            .values(**values).execution_options(synchronize_session=False))
            if res.rowcount != 1:
                actual = s.scalar(select(models.Job.state).where(models.Job.id == job_id))
                if actual is None:
                    raise JobNotFound(job_id)
                raise StaleTransition(job_id, expected, JobState(actual), target)
            text = f"{expected.value} -> {target.value}"
            text += (f" ({cause})" if cause else "") + (f": {message}" if message else "")
            s.add(models.Event(job_id=job_id, at=now, kind="state", message=text))
            row = s.scalar(select(models.Job).where(models.Job.id == job_id))
            assert row is not None
            return Job.of(row)

    def update_job(self, job_id: str, *, last_step: int | None = None, progress: float | None = None,
                   backend_handle: str | None = _UNSET, runs: int | None = None, requeues: int | None = None,
                   now: datetime | None = None) -> None:
        """Record progress (last committed step, fraction done), the backend's handle, or the
        number of runs and requeues the job has had."""
        values: dict[str, Any] = {"updated_at": now or utcnow()}
        if runs is not None:
            values["runs"] = runs
        if requeues is not None:
            values["requeues"] = requeues
        if last_step is not None:
            values["last_step"] = last_step
        if progress is not None:
            values["progress"] = progress
        if backend_handle is not _UNSET:
            values["backend_handle"] = backend_handle
        with self._write() as s:
            res = s.execute(update(models.Job).where(models.Job.id == job_id).values(**values)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                raise JobNotFound(job_id)

    # -- attempts and events ----------------------------------------------------------------

    def start_attempt(self, job_id: str, *, now: datetime | None = None) -> Attempt:
        """Open the job's next attempt (numbered from 1)."""
        now = now or utcnow()
        with self._write() as s:
            # Lock the job row (PostgreSQL; SQLite's IMMEDIATE transaction already serialises),
            # so two writers cannot both pick the same number.
            job = s.scalar(select(models.Job).where(models.Job.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            last = s.scalar(select(func.max(models.Attempt.number)).where(models.Attempt.job_id == job_id)) or 0
            row = models.Attempt(job_id=job_id, number=last + 1, started_at=now, last_step=job.last_step)
            s.add(row)
            s.add(models.Event(job_id=job_id, at=now, kind="attempt",
                               message=f"attempt {last + 1} started" +
                               (f" from step {job.last_step}" if job.last_step is not None else "")))
            return Attempt.of(row)

    def end_attempt(self, job_id: str, number: int, *, cause: str, last_step: int | None = None,
                    steps_lost: int | None = None, now: datetime | None = None) -> Attempt:
        """Close an attempt with why it ended and how much work it lost (steps run after the
        last committed checkpoint). Ending an attempt twice is an error: the first cause stands."""
        now = now or utcnow()
        with self._write() as s:
            row = s.scalar(select(models.Attempt).where(models.Attempt.job_id == job_id,
                                                        models.Attempt.number == number))
            if row is None:
                raise UserError(f"job {job_id} has no attempt {number}")
            if row.ended_at is not None:
                raise UserError(f"attempt {number} of job {job_id} already ended ({row.cause})")
            row.ended_at, row.cause, row.last_step, row.steps_lost = now, cause, last_step, steps_lost
            lost = f", {steps_lost} steps lost" if steps_lost else ""
            s.add(models.Event(job_id=job_id, at=now, kind="attempt",
                               message=f"attempt {number} ended: {cause}{lost}"))
            return Attempt.of(row)

    def started_runs(self, handles: Iterable[str]) -> set[str]:
        """Which of these runs (backend handles) have reported an attempt, i.e. have their
        workers placed: the scheduler counts the others' demand as not yet visible in the
        backend's free capacity."""
        handles = list(handles)
        if not handles:
            return set()
        q = select(models.Attempt.submission).where(models.Attempt.submission.in_(handles)).distinct()
        with self._read() as s:
            return set(s.scalars(q))

    def attempts(self, job_id: str) -> list[Attempt]:
        q = select(models.Attempt).where(models.Attempt.job_id == job_id).order_by(models.Attempt.number)
        with self._read() as s:
            return [Attempt.of(r) for r in s.scalars(q)]

    def add_event(self, job_id: str, kind: str, message: str, *, now: datetime | None = None) -> Event:
        row = models.Event(job_id=job_id, at=now or utcnow(), kind=kind, message=message)
        try:
            with self._write() as s:
                s.add(row)
        except IntegrityError:
            raise JobNotFound(job_id) from None
        return Event.of(row)

    def events(self, job_id: str, *, kind: str | None = None) -> list[Event]:
        q = select(models.Event).where(models.Event.job_id == job_id).order_by(models.Event.id)
        if kind is not None:
            q = q.where(models.Event.kind == kind)
        with self._read() as s:
            return [Event.of(r) for r in s.scalars(q)]
