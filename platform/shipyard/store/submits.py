"""Group commit of submissions: concurrent ``Store.add_job`` calls share one transaction.

Why: with 50 clients submitting at once, each submit used to pay for its own write transaction:
on SQLite the one write lock (``BEGIN IMMEDIATE``, taken in turn) and an fsync of the WAL per
commit, on PostgreSQL a round trip per statement and a WAL flush per commit, plus the ORM's unit
of work. Here one writer thread takes every submission waiting, checks their tenants with one
SELECT, inserts them with one multi-row INSERT per table (SQLAlchemy Core: no identity map, no
flush) and commits once. Each caller's future resolves only after that commit, so "``add_job``
returns (and the API answers 201) only once the job is on disk" holds for every job of a batch.

There is no timer: a batch is whatever arrived while the previous one was committing, so a lone
submit waits for nothing and a burst costs one commit per batch instead of one per job.

A batch whose transaction fails (a constraint, a tenant deleted meanwhile) is retried one job
per transaction, so one bad submission cannot fail the others.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from shipyard.store import models
from shipyard.store.errors import TenantNotFound
from shipyard.store.records import Job
from shipyard.store.states import JobState

log = logging.getLogger(__name__)
MAX_BATCH = 256  # bounds one INSERT's size; a longer queue is simply several batches
_JOBS, _EVENTS, _TENANTS = models.Job.__table__, models.Event.__table__, models.Tenant.__table__


@dataclass
class Submission:
    tenant: str
    name: str
    spec: dict[str, Any]
    priority: int
    now: datetime
    idempotency_key: str | None = None
    id: str = field(default_factory=lambda: f"job-{secrets.token_hex(6)}")
    future: Future = field(default_factory=Future)


def insert_jobs(writer: Engine, subs: Sequence[Submission]) -> list[Job | Exception]:
    """One transaction for ``subs``: a Job per submission, or the TenantNotFound of those whose
    tenant does not exist (which are not inserted). Any other failure raises, committing nothing."""
    with writer.begin() as conn:
        known = set(conn.scalars(select(_TENANTS.c.name).where(_TENANTS.c.name.in_({s.tenant for s in subs}))))
        earlier = _earlier(conn, [s for s in subs if s.tenant in known])
        ok = []
        for s in subs:
            if s.tenant in known and (s.tenant, s.idempotency_key) not in earlier:
                ok.append(s)
                if s.idempotency_key is not None:  # a repeat of this key later in the batch gets this job
                    earlier[(s.tenant, s.idempotency_key)] = s
        seqs: dict[str, int] = {}
        if ok:
            rows = [{"id": s.id, "tenant": s.tenant, "name": s.name, "spec": s.spec, "priority": s.priority,
                     "state": JobState.QUEUED.value, "submitted_at": s.now, "updated_at": s.now,
                     "idempotency_key": s.idempotency_key} for s in ok]
            returned = conn.execute(insert(_JOBS).returning(_JOBS.c.id, _JOBS.c.seq, sort_by_parameter_order=True),
                                    rows)
            seqs = dict(returned.tuples().all())
            conn.execute(insert(_EVENTS), [
                {"job_id": s.id, "at": s.now, "kind": "submitted",
                 "message": f"submitted by tenant {s.tenant} with priority {s.priority}"} for s in ok])
    def result(s: Submission) -> Job | Exception:
        if s.tenant not in known:
            return TenantNotFound(s.tenant)
        first = earlier.get((s.tenant, s.idempotency_key)) if s.idempotency_key is not None else None
        if isinstance(first, Job):
            return first
        s = first or s
        return Job(s.id, s.tenant, s.name, s.spec, s.priority, JobState.QUEUED, s.now, None, None, s.now, None,
                   None, None, None, None, seqs[s.id])

    return [result(s) for s in subs]


def _earlier(conn, subs: Sequence[Submission]) -> dict[tuple[str, str], Job | Submission]:
    """Jobs already stored under the idempotency keys of ``subs``: a retried submit gets the job
    its first attempt created, not a second one."""
    keyed = {(s.tenant, s.idempotency_key) for s in subs if s.idempotency_key is not None}
    if not keyed:
        return {}
    rows = conn.execute(select(_JOBS).where(_JOBS.c.idempotency_key.in_({k for _, k in keyed}))).all()
    return {(r.tenant, r.idempotency_key): Job.of(r) for r in rows if (r.tenant, r.idempotency_key) in keyed}


class GroupCommit:
    """The writer thread behind :meth:`Store.add_job`; started on first use, stopped by ``close``."""

    def __init__(self, writer: Engine, max_batch: int = MAX_BATCH):
        self._writer, self._max = writer, max_batch
        self._queue: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # commits made; with ``jobs`` it shows how much batching happened
        self.jobs = 0

    def submit(self, sub: Submission) -> Future:
        """Queue ``sub``; its future holds the :class:`Job` once committed (or the error)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shipyard-submits", daemon=True)
                self._thread.start()
            self._queue.put(sub)
        return sub.future

    def close(self) -> None:
        """Commit what is queued, then stop the thread (a later submit starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(60)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            # A caller that gave up (an API request whose client went away cancels its future)
            # is dropped here, before its INSERT; after this no future can be cancelled.
            batch = [s for s in batch if s.future.set_running_or_notify_cancel()]
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[Submission]) -> None:
        try:
            results = insert_jobs(self._writer, batch)
        except Exception as e:  # noqa: BLE001 - retried one by one below, each with its own answer
            if len(batch) == 1:
                results = [e]
            else:
                log.warning("a batch of %d submissions failed (%s); committing them one by one", len(batch), e)
                for sub in batch:
                    self._commit([sub])
                return
        self.batches += 1
        self.jobs += sum(1 for r in results if isinstance(r, Job))
        for sub, result in zip(batch, results):
            if isinstance(result, BaseException):
                sub.future.set_exception(result)
            else:
                sub.future.set_result(result)
