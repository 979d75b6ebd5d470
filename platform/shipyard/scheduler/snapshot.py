"""What the scheduler decides over: an immutable picture of the queue, the cluster and the quotas.

The loop builds a :class:`Snapshot` from the store (jobs, tenants) and the backend (nodes);
:func:`shipyard.scheduler.decide` turns it into decisions. Nothing here touches Ray, a database
or a clock, so every policy is a unit test away.

Capacity is what the backend reports as *free* on each node now, so it already excludes the
workers of jobs that are running (and anything else on the cluster). The one thing the backend
cannot know yet is a job the scheduler admitted moments ago whose workers have not been placed
(state ADMITTED, or STARTING: its driver runs but no attempt has been reported): the scheduler
subtracts those itself. Without per-node information, a
snapshot holds one node standing for the whole cluster (:meth:`Snapshot.aggregate`), and fit is
checked on the totals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

EPS = 1e-9


@dataclass(frozen=True)
class Resources:
    """CPUs, GPUs (fractions allowed, as in Ray) and memory in bytes."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory: float = 0.0

    def __add__(self, o: "Resources") -> "Resources":
        return Resources(self.cpus + o.cpus, self.gpus + o.gpus, self.memory + o.memory)

    def __sub__(self, o: "Resources") -> "Resources":
        return Resources(self.cpus - o.cpus, self.gpus - o.gpus, self.memory - o.memory)

    def __mul__(self, n: float) -> "Resources":
        return Resources(self.cpus * n, self.gpus * n, self.memory * n)

    __rmul__ = __mul__

    def fits_in(self, o: "Resources") -> bool:
        return self.cpus <= o.cpus + EPS and self.gpus <= o.gpus + EPS and self.memory <= o.memory + EPS

    def min(self, o: "Resources") -> "Resources":
        return Resources(min(self.cpus, o.cpus), min(self.gpus, o.gpus), min(self.memory, o.memory))

    def clamp(self) -> "Resources":
        return Resources(max(self.cpus, 0.0), max(self.gpus, 0.0), max(self.memory, 0.0))

    def how_many(self, unit: "Resources") -> int:
        """How many ``unit``-sized workers fit in these resources."""
        n = math.inf
        for have, need in ((self.cpus, unit.cpus), (self.gpus, unit.gpus), (self.memory, unit.memory)):
            if need > EPS:
                n = min(n, math.floor(have / need + EPS))
        return 2**31 if n == math.inf else max(int(n), 0)


ZERO = Resources()


@dataclass(frozen=True)
class Node:
    name: str
    free: Resources
    total: Resources | None = None  # default: same as free


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; ``None`` means unlimited."""

    max_gpus: float | None = None
    max_cpus: float | None = None
    max_running_jobs: int | None = None


@dataclass(frozen=True)
class JobRequest:
    """A job as the scheduler sees it: a gang of ``workers`` identical ``per_worker`` demands."""

    id: str
    tenant: str
    priority: int
    submitted_at: datetime
    workers: int
    per_worker: Resources
    seq: int = 0  # final tie-break of the queue order (the store's insertion order)

    @property
    def demand(self) -> Resources:
        return self.per_worker * self.workers

    @classmethod
    def from_spec(cls, id: str, tenant: str, priority: int, submitted_at: datetime, spec: Any,
                  seq: int = 0, memory_per_worker: float = 0.0) -> "JobRequest":
        """From a :class:`~shipyard.spec.JobSpec` (or its JSON dict). Memory per worker is the
        spec's ``workers.memory`` unless the caller gives one (0: not constrained)."""
        from shipyard.spec import Workers

        w = Workers.model_validate(spec.get("workers") or {}) if isinstance(spec, Mapping) else spec.workers
        memory = memory_per_worker or float(w.memory_bytes)
        return cls(id, tenant, priority, submitted_at, w.count, Resources(w.cpus, w.gpus, memory), seq)


class Holding(str, Enum):
    """What a job holding resources is doing, as the scheduler sees it."""

    ADMITTED = "ADMITTED"  # admitted, not submitted or not placed yet: subtracted from free capacity
    STARTING = "STARTING"  # RUNNING in the store, but no attempt reported: its workers may not be placed
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    PREEMPTED = "PREEMPTED"  # draining: stopping after its checkpoint; its resources come back soon


@dataclass(frozen=True)
class RunningJob:
    """A job holding (or about to hold) resources.

    ``state`` is the store's: ADMITTED (workers not placed yet; the scheduler subtracts them from
    free capacity), STARTING (RUNNING in the store, but its run has not reported an attempt, so
    its workers may not be placed yet: subtracted too), RUNNING, RESTARTING, or PREEMPTED
    (draining: stopping after its checkpoint; its resources come back soon). ``placement`` maps
    node name -> workers when the backend knows.
    """

    job: JobRequest
    state: Holding = Holding.RUNNING
    started_at: datetime | None = None
    placement: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", Holding(self.state))  # also from the store's state names

    @property
    def id(self) -> str:
        return self.job.id


@dataclass(frozen=True)
class Snapshot:
    queued: tuple[JobRequest, ...]
    running: tuple[RunningJob, ...] = ()
    nodes: tuple[Node, ...] = ()
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    tenant_priority: Mapping[str, int] = field(default_factory=dict)  # admin-set; absent = 0

    @classmethod
    def aggregate(cls, free: Resources, total: Resources | None = None, **kw) -> "Snapshot":
        """A snapshot whose cluster is known only as totals: one node named ``cluster``."""
        return cls(nodes=(Node("cluster", free, total),), **kw)
