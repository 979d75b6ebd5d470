"""What a job's driver reports while it runs; mixed into :class:`~shipyard.store.Store`.

The driver (``shipyard run`` inside the backend's job, see :mod:`shipyard.runtime.report`) posts
a :class:`~shipyard.run.records.DriverReport` a few times a minute: its attempts, new metric
points, new events, the step, the total and the latest committed checkpoint. :meth:`RunsMixin.record_report` stores one snapshot in one
transaction, so a reader never sees attempts without the step they reached.

Attempts are upserted on ``(job, submission, run_number)``: the driver numbers attempts within
its run from 1, the store numbers them per job across runs (a requeued job's second run
continues the count). Metrics are held to at most :data:`MAX_POINTS` rows per job (recent rows
raw, older ones averaged into buckets: :mod:`shipyard.store.metrics`), so a week-long job costs
as much storage as a one-hour one.

The driver's last report carries the run's outcome (:class:`~shipyard.run.records.RunOutcome`),
stored on the job with the run it belongs to (migration 0005): :meth:`RunsMixin.run_outcome` reads
it back for that run only, so a requeued job's new run never sees its previous run's word.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import func, select, update

from shipyard.run.records import AttemptKind, DriverReport, RunOutcome
from shipyard.store import models
from shipyard.store.errors import JobNotFound
from shipyard.store.metrics import MAX_POINTS  # noqa: F401 - where tests and callers found it
from shipyard.store.records import Attempt

MAX_EVENTS_PER_REPORT = 200
MAX_CAUSE_COLUMN = 64  # the attempts table's short cause (the full text is in the attempt's event)


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc)


def _how(kind: AttemptKind, cause: str | None) -> str:
    """How an attempt ended, for its event: "preempted", not "preempted: preempted"."""
    return kind.value if not cause or cause == kind.value else f"{kind.value}: {cause}"


class RunsMixin:
    """Needs ``self._read()`` and ``self._write()`` session context managers (see Store)."""

    def record_report(self, job_id: str, submission: str, report: DriverReport,
                      now: datetime | None = None) -> list[Attempt]:
        """Store one driver report; returns the job's attempts of this run afterwards."""
        now = now or datetime.now(timezone.utc)
        with self._write() as s:
            job = s.scalar(select(models.Job).where(models.Job.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            runs = {a.run_number: a for a in s.scalars(select(models.Attempt).where(
                models.Attempt.job_id == job_id, models.Attempt.submission == submission))}
            last = s.scalar(select(func.max(models.Attempt.number)).where(models.Attempt.job_id == job_id)) or 0
            for a in sorted(report.attempts, key=lambda a: a.number):
                row = runs.get(a.number)
                if row is None:
                    last += 1
                    row = models.Attempt(job_id=job_id, number=last, submission=submission,
                                         run_number=a.number, started_at=_time(a.start))
                    s.add(row)
                    runs[row.run_number] = row
                    s.add(models.Event(job_id=job_id, at=row.started_at, kind="attempt",
                                       message=f"attempt {last} started" + (
                                           f" from step {a.start_step}" if a.start_step else "")))
                ended = row.ended_at is None and a.end is not None
                row.start_step, row.last_step = a.start_step, a.last_step
                row.committed_step, row.steps_lost, row.recovery_s = a.committed_step, a.steps_lost, a.recovery_s
                if ended:
                    kind = a.kind or AttemptKind.FAILED
                    row.ended_at, row.kind = _time(a.end), kind.value
                    row.cause = (a.cause or kind.value)[:MAX_CAUSE_COLUMN]
                    lost = f", {row.steps_lost} steps lost" if row.steps_lost else ""
                    s.add(models.Event(job_id=job_id, at=row.ended_at, kind="attempt",
                                       message=f"attempt {row.number} ended: {_how(kind, a.cause)}{lost}"))
            for e in report.events[:MAX_EVENTS_PER_REPORT]:
                s.add(models.Event(job_id=job_id, at=_time(e.at), kind="run", message=e.message))
            for p in report.metrics:
                s.add(models.Metric(job_id=job_id, step=p.step, at=_time(p.at), values=dict(p.values)))
            values: dict = {"updated_at": now}
            if report.step is not None:
                values["last_step"] = report.step
            if report.total:
                values["total_steps"] = report.total
                values["progress"] = min(1.0, (report.step or 0) / report.total)
            if report.checkpoint:
                values["checkpoint"] = report.checkpoint
            if report.outcome is not None:
                values["outcome"], values["outcome_run"] = report.outcome.kind.value, submission
            s.execute(update(models.Job).where(models.Job.id == job_id).values(**values)
                      .execution_options(synchronize_session=False))
            if report.metrics:
                self._thin_metrics(s, job_id)
            return [Attempt.of(r) for r in sorted(runs.values(), key=lambda r: r.number)]

    def run_outcome(self, job_id: str, submission: str | None) -> RunOutcome | None:
        """What the driver of run ``submission`` reported as its outcome; None until it has."""
        if submission is None:
            return None
        with self._read() as s:
            row = s.execute(select(models.Job.outcome, models.Job.outcome_run).where(models.Job.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        outcome, run = row
        return RunOutcome(outcome) if outcome and run == submission else None

    def close_run(self, job_id: str, submission: str | None, *, kind: AttemptKind, cause: str,
                  now: datetime | None = None) -> int:
        """End every attempt of a run still open (its driver died before saying how it ended,
        or the run was stopped). Returns how many were closed."""
        now = now or datetime.now(timezone.utc)
        with self._write() as s:
            rows = list(s.scalars(select(models.Attempt).where(
                models.Attempt.job_id == job_id, models.Attempt.submission == submission,
                models.Attempt.ended_at.is_(None))))
            for row in rows:
                row.ended_at, row.kind, row.cause = now, AttemptKind(kind).value, cause[:MAX_CAUSE_COLUMN]
                s.add(models.Event(job_id=job_id, at=now, kind="attempt",
                                   message=f"attempt {row.number} ended: {_how(AttemptKind(kind), cause)}"))
            return len(rows)
