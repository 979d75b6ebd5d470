"""One scheduling pass: snapshot in, decisions out. The loop around it applies them (ADMITTED
transitions and backend submits for ``admit``, PREEMPTED transitions and SIGTERM for
``preempt``) and shows ``reasons`` to users; it calls :func:`decide` again on the next tick.

The pass walks the queue in order (:mod:`.queue`). Each job is checked against its tenant's
quota (:mod:`.quota`), then against what an empty cluster could hold, then gang-placed
(:mod:`.admission`). The first job that passes the first two checks but does not fit is the
*head*: it may preempt lower-priority jobs (:mod:`.preemption`) and it gets a reservation
(:mod:`.backfill`); jobs behind it start only in what the reservation leaves.

A STARTING job (running, but its workers not known to be placed yet) is counted as holding its
demand, so nothing is admitted into capacity it is about to take; since the backend may count
it already, a head that would fit without that double count waits instead of preempting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard.scheduler import admission, backfill, preemption, quota
from shipyard.scheduler.admission import Free, Placement, give
from shipyard.scheduler.queue import order
from shipyard.scheduler.snapshot import Holding, JobRequest, Resources, RunningJob, Snapshot


@dataclass(frozen=True)
class Policy:
    backfill: bool = True  # False: strict order, nothing starts while the head waits
    preemption: bool = True


@dataclass(frozen=True)
class Admission:
    job_id: str
    placement: Placement
    backfilled_past: str | None = None  # the waiting head this job started ahead of


@dataclass
class Decisions:
    admit: list[Admission] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    # Waiting jobs and victims -> why, shown as the API's `waiting`: so "needs 4 GPUs, 2 free",
    # not "waiting: ..."; a quota or an impossible shape says so ("quota: ...", "unschedulable: ...").
    reasons: dict[str, str] = field(default_factory=dict)
    head: str | None = None  # the job holding the reservation

    @property
    def admitted(self) -> list[str]:
        return [a.job_id for a in self.admit]


def decide(snap: Snapshot, policy: Policy = Policy()) -> Decisions:
    out = Decisions()
    free = admission.Capacity(admission.initial_free(snap))
    node_names = sorted(free.free)
    node_totals = admission.totals(snap)
    usage = quota.usage_by_tenant(snap.running)
    draining = [r for r in snap.running if r.state is Holding.PREEMPTED]
    head: JobRequest | None = None
    available = free  # after the head is found: free minus the head's reservation
    never: dict[Resources, int] = {}  # worker shape -> workers an empty cluster holds

    for job in order(snap.queued, snap.tenant_priority):
        why = quota.blocked(job, usage.get(job.tenant), snap.quotas.get(job.tenant))
        why = why or admission.unschedulable(job, node_totals, never)
        if why:
            out.reasons[job.id] = why
            continue
        if head is not None and not policy.backfill:
            out.reasons[job.id] = f"behind {head.id} (priority {head.priority}), which starts first"
            continue
        placement = available.place(job)
        if placement is not None:
            free.take(placement, job.per_worker)
            if available is not free:
                available.take(placement, job.per_worker)
            usage.setdefault(job.tenant, quota.Usage()).add(job)
            out.admit.append(Admission(job.id, placement, head.id if head else None))
            continue
        if head is None:
            head = job
            out.head = job.id
            available = free.minus(_stop_for_head(job, free, snap, draining, node_names, node_totals, policy, out))
        elif free.place(job) is not None:
            out.reasons[job.id] = (f"fits only in capacity held for {head.id} (priority "
                                   f"{head.priority}), which is first in the queue")
        else:
            out.reasons[job.id] = admission.shortage(job, available)
    return out


def _as_if_placed(free: Free, starting: list[RunningJob], node_names: list[str]) -> Free:
    for r in starting:
        free = give(free, admission.credit_of(r, node_names))
    return free


def _stop_for_head(head: JobRequest, cap: admission.Capacity, snap: Snapshot, draining: list[RunningJob],
                   node_names: list[str], node_totals: Free | None, policy: Policy, out: Decisions) -> Free:
    """Reasons, preemptions and the reservation for the head; returns what it holds."""
    free = cap.free
    releasing: Free = {}
    for r in draining:
        releasing = give(releasing, admission.credit_of(r, node_names))
    base = admission.shortage(head, cap)
    starting = [r for r in snap.running if r.state is Holding.STARTING]
    if draining and admission.place(head, give(free, releasing)) is not None:
        names = ", ".join(r.id for r in draining)
        out.reasons[head.id] = f"{base}; preempted jobs {names} are stopping"
    elif starting and admission.place(head, _as_if_placed(free, starting, node_names)) is not None:
        # Their demand was taken off free capacity, but their workers may be placed already
        # (the backend then counts them too): the shortage may not be real, so stop nobody yet.
        names = ", ".join(r.id for r in starting)
        out.reasons[head.id] = f"{base}; jobs {names} are starting"
    elif policy.preemption:
        victims = preemption.choose_victims(head, give(free, releasing), snap.running, node_names,
                                            snap.tenant_priority)
        if victims:
            for v in victims:
                out.preempt.append(v.id)
                out.reasons[v.id] = f"preempted for {head.id} ({_outranks(head, v.job, snap)})"
                releasing = give(releasing, admission.credit_of(v, node_names))
            out.reasons[head.id] = f"{base}; preempting {', '.join(v.id for v in victims)}"
        else:
            out.reasons[head.id] = base
    else:
        out.reasons[head.id] = base
    return backfill.reservation(head, free, releasing, node_totals)


def _outranks(head: JobRequest, victim: JobRequest, snap: Snapshot) -> str:
    if head.tenant == victim.tenant:
        return f"priority {head.priority} > {victim.priority}"
    tp = snap.tenant_priority
    return (f"tenant {head.tenant}'s priority {tp.get(head.tenant, 0)} > tenant {victim.tenant}'s "
            f"{tp.get(victim.tenant, 0)}")
