"""What a job's driver reports while it runs; mixed into :class:`~shipyard.store.Store`.

The driver (``shipyard run`` inside the backend's job, see :mod:`shipyard.runtime.report`) posts
a snapshot a few times a minute: its attempts, new metric points, new events, the step, the total
and the latest committed checkpoint. :meth:`RunsMixin.record_report` stores one snapshot in one
transaction, so a reader never sees attempts without the step they reached.

Attempts are upserted on ``(job, submission, run_number)``: the driver numbers attempts within
its run from 1, the store numbers them per job across runs (a requeued job's second run
continues the count). Metrics are held to at most :data:`MAX_POINTS` rows per job (recent rows
raw, older ones averaged into buckets: :mod:`shipyard.store.metrics`), so a week-long job costs
as much storage as a one-hour one.

The driver's last report carries the run's outcome (:class:`~shipyard.runtime.report.RunOutcome`),
stored on the job with the run it belongs to (migration 0005): :meth:`RunsMixin.run_outcome` reads
it back for that run only, so a requeued job's new run never sees its previous run's word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select, update

from shipyard.runtime.report import RunOutcome
from shipyard.store import models
from shipyard.store.errors import JobNotFound
from shipyard.store.metrics import MAX_POINTS  # noqa: F401 - where tests and callers found it
from shipyard.store.records import Attempt

MAX_EVENTS_PER_REPORT = 200
KINDS = ("finished", "failed", "preempted", "user_error")


def _time(t: Any) -> datetime | None:
    if t is None:
        return None
    return datetime.fromtimestamp(float(t), timezone.utc)


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class RunsMixin:
    """Needs ``self._read()`` and ``self._write()`` session context managers (see Store)."""

    def record_report(self, job_id: str, submission: str, *, step: int | None = None, total: int | None = None,
                      checkpoint: str | None = None, attempts: Sequence[Mapping[str, Any]] = (),
                      events: Sequence[tuple[float, str]] = (),
                      metrics: Sequence[tuple[int, float, Mapping[str, Any]]] = (),
                      outcome: RunOutcome | None = None, now: datetime | None = None) -> list[Attempt]:
        """Store one driver snapshot; returns the job's attempts of this run afterwards."""
        now = now or datetime.now(timezone.utc)
        with self._write() as s:
            job = s.scalar(select(models.Job).where(models.Job.id == job_id).with_for_update())
            if job is None:
                raise JobNotFound(job_id)
            runs = {a.run_number: a for a in s.scalars(select(models.Attempt).where(
                models.Attempt.job_id == job_id, models.Attempt.submission == submission))}
            last = s.scalar(select(func.max(models.Attempt.number)).where(models.Attempt.job_id == job_id)) or 0
            for a in sorted(attempts, key=lambda a: int(a["number"])):
                row = runs.get(int(a["number"]))
                if row is None:
                    last += 1
                    row = models.Attempt(job_id=job_id, number=last, submission=submission,
                                         run_number=int(a["number"]), started_at=_time(a.get("start")) or now)
                    s.add(row)
                    runs[row.run_number] = row
                    s.add(models.Event(job_id=job_id, at=row.started_at, kind="attempt",
                                       message=f"attempt {last} started" + (
                                           f" from step {a['start_step']}" if a.get("start_step") else "")))
                ended = row.ended_at is None and a.get("end") is not None
                row.start_step, row.last_step = _int(a.get("start_step")), _int(a.get("last_step"))
                row.committed_step, row.steps_lost = _int(a.get("committed_step")), _int(a.get("steps_lost"))
                row.recovery_s = _number(a.get("recovery_s"))
                if ended:
                    row.ended_at, row.kind = _time(a["end"]), a.get("kind") if a.get("kind") in KINDS else "failed"
                    row.cause = (a.get("cause") or row.kind)[:64]
                    lost = f", {row.steps_lost} steps lost" if row.steps_lost else ""
                    s.add(models.Event(job_id=job_id, at=row.ended_at, kind="attempt",
                                       message=f"attempt {row.number} ended: {row.kind}"
                                               f"{': ' + a['cause'] if a.get('cause') else ''}{lost}"))
            for t, message in list(events)[:MAX_EVENTS_PER_REPORT]:
                s.add(models.Event(job_id=job_id, at=_time(t) or now, kind="run", message=str(message)[:2000]))
            for point_step, t, values in metrics:
                clean = {str(k): _number(v) for k, v in values.items()}
                s.add(models.Metric(job_id=job_id, step=int(point_step), at=_time(t) or now, values=clean))
            values: dict[str, Any] = {"updated_at": now}
            if step is not None:
                values["last_step"] = int(step)
            if total:
                values["total_steps"] = int(total)
                values["progress"] = min(1.0, int(step or 0) / int(total))
            if checkpoint:
                values["checkpoint"] = str(checkpoint)
            if outcome is not None:
                values["outcome"], values["outcome_run"] = RunOutcome(outcome).value, submission
            s.execute(update(models.Job).where(models.Job.id == job_id).values(**values)
                      .execution_options(synchronize_session=False))
            if metrics:
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

    def close_run(self, job_id: str, submission: str | None, *, kind: str, cause: str,
                  now: datetime | None = None) -> int:
        """End every attempt of a run still open (its driver died before saying how it ended,
        or the run was stopped). Returns how many were closed."""
        now = now or datetime.now(timezone.utc)
        with self._write() as s:
            rows = list(s.scalars(select(models.Attempt).where(
                models.Attempt.job_id == job_id, models.Attempt.submission == submission,
                models.Attempt.ended_at.is_(None))))
            for row in rows:
                row.ended_at, row.kind, row.cause = now, kind, cause[:64]
                s.add(models.Event(job_id=job_id, at=now, kind="attempt",
                                   message=f"attempt {row.number} ended: {kind}: {cause}"))
            return len(rows)
