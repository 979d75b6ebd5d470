"""Decisions over a run's records: pure functions, hand-built inputs, enum outputs.

- :func:`outcome_of`: the driver's verdict on a run it saw end by itself;
- :func:`run_state`: RUNNING or RESTARTING for a job, from its run's attempts (the report route).
"""

from __future__ import annotations

from collections.abc import Sequence

from shipyard.run.records import AttemptKind, AttemptRecord, RunOutcome, RunSnapshot
from shipyard.store.states import JobState


def outcome_of(snapshot: RunSnapshot, *, ok: bool, user_error: bool, stop_requested: bool) -> RunOutcome:
    """A run is ``finished`` only when the training function returned without a stop request,
    or when it trained to the end of its data although one arrived (a stop that reached a run
    writing its last step); one that returned after a stop request short of the end is
    ``stopped`` (the attempt Ray Train opened after a preemption, a loop that returned early)."""
    if not ok:
        return RunOutcome.USER_ERROR if user_error else RunOutcome.FAILED
    if stop_requested and not snapshot.trained_to_end():
        return RunOutcome.STOPPED
    return RunOutcome.FINISHED


def run_state(attempts: Sequence[AttemptRecord]) -> JobState | None:
    """RESTARTING while the newest attempt has ended (the group is being restarted) or is a
    restart that has not reached its first step; RUNNING otherwise; None when the run has no
    attempt yet or its last one finished (the loop decides the terminal state)."""
    if not attempts:
        return None
    last = attempts[-1]
    if not last.open:
        return None if last.kind is AttemptKind.FINISHED else JobState.RESTARTING
    if len(attempts) > 1 and last.recovery_s is None:
        return JobState.RESTARTING
    return JobState.RUNNING
