"""The job state machine: the one place that says which state may follow which.

::

    QUEUED -> ADMITTED -> RUNNING -> (RESTARTING -> RUNNING)* -> SUCCEEDED | FAILED | CANCELLED
    ADMITTED | RUNNING -> PREEMPTED -> QUEUED       (requeued with its progress kept)
                          PREEMPTED -> SUCCEEDED    (the run finished before it could stop)

A job may be cancelled from every state in which it is waiting or holds resources, and may fail
from every state in which it has been handed to a backend. Everything else is rejected here, by
:func:`check_transition`, so the store, the scheduler loop and the API cannot disagree.

Three choices beyond the bare diagram, and why:

- ``PREEMPTED -> CANCELLED``: a preempted job spends its checkpoint grace period in PREEMPTED;
  a user who cancels it then means "don't requeue", and a 409 would only make them retry.
- ``PREEMPTED -> SUCCEEDED``: the stop reaches a run that is writing its last step; requeueing
  it would start a whole new run only to restore the final checkpoint and end.
- ``RESTARTING`` jobs are not preemptible: preemption asks the workers to checkpoint on SIGTERM,
  and a worker group that is being restarted has nobody to take that checkpoint.
"""

from __future__ import annotations

from enum import Enum

from shipyard.errors import UserError


class JobState(str, Enum):
    QUEUED = "QUEUED"
    ADMITTED = "ADMITTED"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    PREEMPTED = "PREEMPTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def holds_resources(self) -> bool:
        """Whether a job in this state occupies cluster capacity (and counts against quotas)."""
        return self in HOLDING


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.ADMITTED, S.CANCELLED}),
    S.ADMITTED: frozenset({S.RUNNING, S.PREEMPTED, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.RESTARTING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PREEMPTED}),
    S.RESTARTING: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    S.PREEMPTED: frozenset({S.QUEUED, S.CANCELLED, S.SUCCEEDED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# PREEMPTED jobs still hold their workers until the checkpoint is committed and they stop.
HOLDING = frozenset({S.ADMITTED, S.RUNNING, S.RESTARTING, S.PREEMPTED})
ACTIVE = frozenset(TRANSITIONS) - TERMINAL


class IllegalTransition(UserError):
    """A transition the state machine does not allow (e.g. cancelling a finished job).

    The API answers 409 Conflict: the request was well formed but the job's state forbids it.
    """

    def __init__(self, job_id: str | None, current: JobState, target: JobState, detail: str | None = None):
        self.job_id, self.current, self.target = job_id, current, target
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current]))
        allowed = allowed or "none: the job has finished"
        who = f"job {job_id}" if job_id else "a job"
        super().__init__(detail or f"{who} is {current.value} and cannot become {target.value} (allowed next: {allowed})")


class StaleTransition(IllegalTransition):
    """A compare-and-set transition whose expected state is no longer the job's state.

    Another writer (the scheduler loop, a user's cancel) moved the job first; the caller should
    re-read the job and decide again rather than overwrite that writer's decision.
    """

    def __init__(self, job_id: str, expected: JobState, actual: JobState, target: JobState):
        self.expected = expected
        super().__init__(job_id, actual, target,
                         f"job {job_id} is {actual.value}, not {expected.value} as expected; "
                         f"it was not moved to {target.value} (another writer changed it first)")


def parse_state(value: str | JobState) -> JobState:
    """A state from user input (any case); unknown names are a :class:`UserError` listing them."""
    if isinstance(value, JobState):
        return value
    try:
        return JobState(str(value).upper())
    except ValueError:
        raise UserError(f"unknown job state {value!r}; expected one of: "
                        f"{', '.join(s.value for s in JobState)}") from None


def check_transition(current: JobState, target: JobState, job_id: str | None = None) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is an edge of the machine."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(job_id, current, target)


def can_transition(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]
