"""Gang admission: a job starts only when ALL its workers fit at once, never part of them.

Workers are identical, so whether a gang fits is exact and cheap: node ``n`` can take
``k_n = how_many(free_n, per_worker)`` workers, and the gang fits iff ``sum(k_n) >= workers``.
Where it goes (:func:`place`): on one node if any can take the whole gang (the *tightest* such
node, keeping big holes for big jobs), otherwise across the fewest nodes (largest first, which
also keeps a multi-node job's collectives on as few links as possible).
"""

from __future__ import annotations

from collections.abc import Mapping

from shipyard.scheduler.quota import fmt
from shipyard.scheduler.snapshot import EPS, ZERO, Holding, JobRequest, Resources, RunningJob, Snapshot

Placement = dict[str, int]
Free = dict[str, Resources]


def place(job: JobRequest, free: Mapping[str, Resources]) -> Placement | None:
    """Node -> worker count for the whole gang, or ``None`` if it does not fit."""
    slots = {n: r.how_many(job.per_worker) for n, r in free.items()}
    if sum(min(k, job.workers) for k in slots.values()) < job.workers:
        return None
    whole = [n for n, k in slots.items() if k >= job.workers]
    if whole:
        return {min(whole, key=lambda n: (slots[n], n)): job.workers}
    out: Placement = {}
    left = job.workers
    for n in sorted(slots, key=lambda n: (-slots[n], n)):
        if left == 0 or slots[n] == 0:
            break
        out[n] = min(slots[n], left)
        left -= out[n]
    return out


class Capacity:
    """Free capacity per node during one pass, with what makes a 10,000-job queue cheap.

    Capacity only shrinks during a pass, so once a gang of ``n`` workers of some shape does not
    fit, no gang of that shape with ``n`` or more workers will: later ones are answered from a
    memo instead of a scan of every node. The aggregate is kept alongside for the reasons.
    """

    def __init__(self, free: Mapping[str, Resources]):
        self.free: Free = dict(free)
        self.total = total(self.free)
        self._no_fit: dict[Resources, int] = {}

    def place(self, job: JobRequest) -> Placement | None:
        known = self._no_fit.get(job.per_worker)
        if known is not None and job.workers >= known:
            return None
        placement = place(job, self.free)
        if placement is None:
            self._no_fit[job.per_worker] = job.workers if known is None else min(known, job.workers)
        return placement

    def take(self, placement: Mapping[str, int], per_worker: Resources) -> None:
        take(self.free, placement, per_worker)
        self.total = (self.total - per_worker * sum(placement.values())).clamp()

    def minus(self, held: Mapping[str, Resources]) -> "Capacity":
        return Capacity(minus(self.free, held))


def take(free: Free, placement: Mapping[str, int], per_worker: Resources) -> None:
    for n, k in placement.items():
        free[n] = (free[n] - per_worker * k).clamp()


def give(free: Free, credit: Mapping[str, Resources]) -> Free:
    out = dict(free)
    for n, r in credit.items():
        out[n] = out.get(n, ZERO) + r
    return out


def minus(free: Mapping[str, Resources], held: Mapping[str, Resources]) -> Free:
    return {n: (r - held.get(n, ZERO)).clamp() for n, r in free.items()}


def total(free: Mapping[str, Resources]) -> Resources:
    out = ZERO
    for r in free.values():
        out = out + r
    return out


UNPLACED = (Holding.ADMITTED, Holding.STARTING)


def credit_of(r: RunningJob, nodes: list[str]) -> dict[str, Resources]:
    """What ``r`` gives back per node when it stops. Unknown placement on a multi-node
    cluster gives nothing countable: the scheduler will not bet on where it lands."""
    if r.placement is not None:
        return {n: r.job.per_worker * k for n, k in r.placement.items()}
    if len(nodes) == 1:
        return {nodes[0]: r.job.demand}
    return {}


def initial_free(snap: Snapshot) -> Free:
    """Free capacity per node, minus jobs the backend has not placed yet (ADMITTED, STARTING)."""
    free: Free = {n.name: n.free for n in snap.nodes}
    for r in snap.running:
        if r.state not in UNPLACED:
            continue
        placement = dict(r.placement) if r.placement is not None else place(r.job, free)
        if placement is None:  # partly visible to the backend already: take what is there
            placement, left = {}, r.job.workers
            for n in sorted(free):
                k = min(left, free[n].how_many(r.job.per_worker))
                placement[n], left = k, left - k
        take(free, placement, r.job.per_worker)
    return free


def totals(snap: Snapshot) -> Free | None:
    """Each node's total capacity, or ``None`` if the backend did not say."""
    if not snap.nodes or any(n.total is None for n in snap.nodes):
        return None
    return {n.name: n.total for n in snap.nodes}  # type: ignore[misc]


def describe(r: Resources) -> str:
    parts = []
    if r.gpus > EPS:
        parts.append(f"{fmt(r.gpus)} GPU{'s' if r.gpus != 1 else ''}")
    if r.cpus > EPS:
        parts.append(f"{fmt(r.cpus)} CPU{'s' if r.cpus != 1 else ''}")
    if r.memory > EPS:
        parts.append(f"{fmt(r.memory / 2**30)} GiB")
    return " + ".join(parts) or "nothing"


def _short_dimension(need: Resources, have: Resources) -> str | None:
    for label, n, h in (("GPUs", need.gpus, have.gpus), ("CPUs", need.cpus, have.cpus),
                        ("GiB memory", need.memory / 2**30, have.memory / 2**30)):
        if n > h + EPS:
            return f"needs {fmt(n)} {label}, {fmt(max(h, 0.0))} {{what}}"
    return None


def shortage(job: JobRequest, cap: Capacity) -> str:
    """Why the gang does not fit in ``cap`` now, in the terms a user thinks in."""
    short = _short_dimension(job.demand, cap.total)
    if short:
        return short.format(what="free")
    fit = sum(min(r.how_many(job.per_worker), job.workers) for r in cap.free.values())
    return (f"needs {job.workers} workers of {describe(job.per_worker)} each; the free capacity is split "
            f"across nodes so that only {fit} fit")


def unschedulable(job: JobRequest, node_totals: Mapping[str, Resources] | None,
                  memo: dict[Resources, int] | None = None) -> str | None:
    """Why the job could never fit even on an empty cluster (``None``: it could, or totals are
    unknown). Such a job must not hold a reservation: it would block the queue forever.
    ``memo`` caches, per worker shape, how many workers an empty cluster holds."""
    if node_totals is None:
        return None
    memo = {} if memo is None else memo
    if job.per_worker not in memo:
        memo[job.per_worker] = sum(r.how_many(job.per_worker) for r in node_totals.values())
    if job.workers <= memo[job.per_worker]:
        return None
    short = _short_dimension(job.demand, total(node_totals))
    if short:
        return "unschedulable: " + short.format(what="in the whole cluster")
    if not any(job.per_worker.fits_in(r) for r in node_totals.values()):
        return f"unschedulable: one worker needs {describe(job.per_worker)}, more than any node has"
    return f"unschedulable: {job.workers} workers of {describe(job.per_worker)} do not fit on the cluster's nodes"
