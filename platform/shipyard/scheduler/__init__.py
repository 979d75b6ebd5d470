"""Scheduling decisions as pure functions over a :class:`Snapshot` (no Ray, database or clock).

``decide(snapshot) -> Decisions(admit, preempt, reasons)``; one module per concept: ``queue``
(order), ``quota`` (per-tenant limits), ``admission`` (gang fit and placement), ``backfill``
(the head's reservation), ``preemption`` (victims), ``decide`` (the pass tying them together).
"""

from shipyard.scheduler.decide import Admission, Decisions, Policy, decide
from shipyard.scheduler.snapshot import JobRequest, Node, Quota, Resources, RunningJob, Snapshot

__all__ = ["decide", "Decisions", "Admission", "Policy", "Snapshot", "JobRequest", "RunningJob", "Node",
           "Quota", "Resources"]
