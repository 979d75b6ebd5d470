"""Elastic jobs (``workers: {min, max}``): growing back without losing a step.

Ray Train's elastic scaling policy does the sizing: it starts a group with as many workers as the
cluster can place (at least ``min``), restarts a failed group at whatever size fits then (a lost
node shrinks the job instead of stalling it), and every ``workers.resize_interval_s`` checks
whether more would fit now. Shrinking needs nothing from shipyard beyond what any restart gets:
the next attempt resumes from the last committed checkpoint, DCP reshards the model and optimizer,
and the data stream repartitions the epoch's unconsumed rows over the new world exactly.

Growing is different: Ray Train replaces a *healthy* group, killing its workers, so everything
since the last checkpoint would be lost. :class:`GrowWithCheckpoint` runs in the controller just
before a resize of a running group is carried out, asks every rank to stop the way a preemption
notice does (``preemption.request``: all ranks checkpoint at one step, wait for the commit, and
leave the loop), waits for them, and records the attempt as ``preempted`` (a resize is no
failure, so it spends none of ``max_failures``). The larger group resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import time

from shipyard.runtime import preemption
from shipyard.runtime.ray_adapter import ControllerCallback, WorkerGroupCallback

log = logging.getLogger(__name__)


class GrowWithCheckpoint(ControllerCallback, WorkerGroupCallback):
    """Checkpoint a running group before Ray Train resizes it (see the module docstring)."""

    def __init__(self, board, grace_s: float):
        self.board, self.grace_s = board, grace_s
        self._group = None

    def after_worker_group_start(self, worker_group) -> None:
        self._group = worker_group

    def before_worker_group_shutdown(self, worker_group) -> None:
        self._group = None

    def after_worker_group_abort(self, worker_group_context) -> None:
        self._group = None

    def before_controller_execute_resize_decision(self, decision) -> None:
        import ray

        group = self._group
        if group is None:  # a first start or a restart after a failure: nothing running to save
            return
        old, new = len(group.get_workers()), decision.num_workers
        why = f"was asked to stop: the job grows from {old} to {new} workers"
        log.info("elastic: %s workers fit now (running with %s); checkpointing before the resize", new, old)
        try:
            group.execute(preemption.request, why, self.grace_s)
        except Exception as e:  # a worker already gone: the resize goes on, as a failure would
            log.warning("elastic: could not ask the workers to checkpoint before the resize: %s", e)
            return
        deadline = time.monotonic() + self.grace_s + 5
        while time.monotonic() < deadline:
            status = group.poll_status(timeout=5)
            if status.finished:
                break
            time.sleep(0.2)
        ray.get(self.board.attempt_failed.remote(f"resized: {old} -> {new} workers", "preempted"))
