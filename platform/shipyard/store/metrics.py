"""Training metrics reported by jobs; mixed into :class:`~shipyard.store.Store`.

One row per report (``{name: value}`` at a step). A driver reports about one row a second, so a
week-long run would keep 600,000 rows per job; instead every job is held to :data:`MAX_POINTS`
rows by one rule (:func:`downsample`, applied whenever a write passes the limit):

- the newest :data:`RECENT_POINTS` rows (in step order) stay as reported: the live end of the
  chart keeps full resolution;
- every older row is averaged into a bucket of ``width`` steps (buckets start at multiples of
  ``width``; ``width`` is the smallest power of two that fits those rows into
  :data:`OLD_BUCKETS` buckets): per metric, the mean of the rows that reported a number (a
  metric reported only now and then, such as an evaluation, survives in its bucket; a bucket
  of NaNs stays null), at the bucket's first step and its last row's time.

Widths are powers of two, so a later thinning merges whole earlier buckets and the old part of a
curve stays evenly spaced in steps. After a thinning at most ``OLD_BUCKETS + RECENT_POINTS``
rows are left, so the next one comes only after hundreds of further reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from shipyard.errors import UserError
from shipyard.store import models
from shipyard.store.errors import JobNotFound
from shipyard.store.records import MetricPoint


MAX_POINTS = 1000
RECENT_POINTS = 200
OLD_BUCKETS = 400


def downsample(rows: list[tuple[int, datetime, dict]], *, max_points: int = MAX_POINTS,
               recent: int = RECENT_POINTS, buckets: int = OLD_BUCKETS) -> list[tuple[int, datetime, dict]] | None:
    """The rows to keep under the module's rule, or None when ``rows`` (in step order) fit as they are.

    Rows are ``(step, at, values)``; the result is in step order.
    """
    if len(rows) <= max_points:
        return None
    old, new = rows[:len(rows) - recent], rows[len(rows) - recent:]
    first, last = old[0][0], old[-1][0]
    width = 1
    while last // width - first // width + 1 > buckets:
        width *= 2
    merged: list[tuple[int, datetime, dict]] = []
    group: list[tuple[int, datetime, dict]] = []
    for row in old:
        if group and row[0] // width != group[0][0] // width:
            merged.append(_mean(group))
            group = []
        group.append(row)
    merged.append(_mean(group))
    return merged + new


def _mean(group: list[tuple[int, datetime, dict]]) -> tuple[int, datetime, dict]:
    if len(group) == 1:
        return group[0]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _, _, values in group:
        for k, v in values.items():
            sums.setdefault(k, 0.0)
            counts.setdefault(k, 0)
            if v is not None:
                sums[k] += v
                counts[k] += 1
    values = {k: (sums[k] / counts[k] if counts[k] else None) for k in sums}
    return group[0][0], group[-1][1], values


class MetricsMixin:
    """Needs ``self._read()`` and ``self._write()`` session context managers (see Store)."""

    def append_metrics(self, job_id: str, step: int, values: Mapping[str, float], *,
                       now: datetime | None = None) -> MetricPoint:
        clean: dict[str, float] = {}
        for k, v in values.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise UserError(f"metric {k!r}: got {v!r}; must be a number") from None
            # JSON has no NaN/inf; keep them as None so a diverged loss is still visible as a gap.
            clean[str(k)] = f if math.isfinite(f) else None  # type: ignore[assignment]
        row = models.Metric(job_id=job_id, step=int(step), at=now or datetime.now(timezone.utc), values=clean)
        try:
            with self._write() as s:
                s.add(row)
                s.flush()
                self._thin_metrics(s, job_id)
        except IntegrityError:
            raise JobNotFound(job_id) from None
        return MetricPoint.of(row)

    def metrics(self, job_id: str, *, names: list[str] | None = None, since_step: int | None = None,
                limit: int = 10_000) -> list[MetricPoint]:
        """Reports in step order; with ``names``, each point keeps only those metrics (points
        with none of them are dropped)."""
        q = select(models.Metric).where(models.Metric.job_id == job_id).order_by(models.Metric.step, models.Metric.id)
        if since_step is not None:
            q = q.where(models.Metric.step >= since_step)
        with self._read() as s:
            points = [MetricPoint.of(r) for r in s.scalars(q.limit(limit))]
        if names is None:
            return points
        wanted = set(names)
        out = []
        for p in points:
            kept = {k: v for k, v in p.values.items() if k in wanted}
            if kept:
                out.append(MetricPoint(p.job_id, p.step, p.at, kept))
        return out

    def latest_metrics(self, job_id: str, *, window: int = 1000) -> dict[str, float]:
        """The last reported value of every metric (what ``GET /jobs/{id}`` shows), looking at
        the newest ``window`` reports: a metric silent for longer than that is left out."""
        q = (select(models.Metric).where(models.Metric.job_id == job_id)
             .order_by(models.Metric.step.desc(), models.Metric.id.desc()).limit(window))
        latest: dict[str, float] = {}
        with self._read() as s:
            for row in s.scalars(q):
                for k, v in row.values.items():
                    latest.setdefault(k, v)
        return latest

    @staticmethod
    def _thin_metrics(s, job_id: str) -> None:
        """Apply :func:`downsample` to a job's rows inside the caller's write transaction."""
        M = models.Metric
        if s.scalar(select(func.count()).select_from(M).where(M.job_id == job_id)) <= MAX_POINTS:
            return
        rows = s.execute(select(M.id, M.step, M.at, M.values).where(M.job_id == job_id).order_by(M.step, M.id)).all()
        kept = downsample([(r.step, r.at, r.values) for r in rows])
        if kept is None:
            return
        # Rows kept as they were are left alone; each merged bucket replaces the rows it holds.
        kept_ids, stored_ids = {id(v) for _, _, v in kept}, {id(r.values) for r in rows}
        gone = [r.id for r in rows if id(r.values) not in kept_ids]
        merged = [{"job_id": job_id, "step": step, "at": at, "values": values}
                  for step, at, values in kept if id(values) not in stored_ids]
        s.execute(delete(M).where(M.id.in_(gone)).execution_options(synchronize_session=False))
        if merged:
            s.execute(insert(M), merged)
