"""Training metrics reported by jobs; mixed into :class:`~shipyard.store.Store`.

One row per report (``{name: value}`` at a step). Reports arrive at most about once a second
per job (the runtime throttles them), so rows stay few enough to keep raw; downsampling for
long jobs belongs to the query side and can come later without a schema change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from shipyard.errors import UserError
from shipyard.store import models
from shipyard.store.errors import JobNotFound
from shipyard.store.records import MetricPoint


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
