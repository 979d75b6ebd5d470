"""Attempts: one record per start of the worker group, and the failure budget they spend.

Ray Train restarts the worker group after a failure; shipyard records each of those starts as an
attempt (start, end, cause, the step it resumed from, the last step it reached, the last step it
committed, steps lost) so that a user can see what happened, and decides itself whether another
attempt is allowed. Ray's own budget (``FailureConfig.max_failures``) counts every worker-group
error alike, but a preemption (SIGTERM -> checkpoint -> restart, see ``preemption.py``) loses no
work and must not use up ``max_failures`` -- on a spot fleet it would end a healthy job. So Ray
is told to retry without limit, and :meth:`Ledger.admit`, asked by every rank before the user's
code runs, stops the job once failures other than preemptions exceed ``max_failures``.

The :class:`Ledger` is plain data with no clock of its own (time is an argument), kept inside the
driver's ``ProgressBoard`` actor. :class:`AttemptsCallback` runs in Ray Train's controller and
closes the current attempt with its cause before the controller restarts the group.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ray.train.v2.api.callback import UserCallback

MAX_CAUSE_CHARS = 300


@dataclass
class Attempt:
    number: int
    start: float
    world: int | None = None  # ranks in this attempt (an elastic job's size changes between attempts)
    start_step: int | None = None  # the step it resumed from (None until restored)
    entered: float | None = None  # when rank 0 entered the train loop (process group up)
    restored_at: float | None = None  # when rank 0 had loaded the checkpoint (or found none)
    first_step_at: float | None = None  # when its first training step finished
    last_step: int = 0  # the furthest step reported (rank 0 reports at most once a second)
    last_step_at: float | None = None  # when last_step was reported
    committed_step: int | None = None  # last checkpoint committed during this attempt
    end: float | None = None
    cause: str | None = None  # None while running or when it finished normally
    kind: str | None = None  # how it ended: finished | failed | preempted | user_error
    steps_lost: int | None = None  # known once the next attempt has restored

    @property
    def recovery_s(self) -> float | None:
        """Seconds from the start of this attempt to its first step (for a restart: time to recover)."""
        return None if self.first_step_at is None else self.first_step_at - self.start


@dataclass
class Ledger:
    max_failures: int  # -1: unlimited
    attempts: list[Attempt] = field(default_factory=list)
    exhausted: str | None = None  # set when admit() refused another attempt

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].end is None else None

    @property
    def failures(self) -> int:
        """Ended attempts that count against ``max_failures`` (preemptions do not)."""
        return sum(1 for a in self.attempts if a.kind in ("failed", "user_error"))

    def admit(self, now: float, world: int | None = None) -> str | None:
        """Open an attempt (once per worker-group start; every rank asks). Returns why not, if not."""
        if self.current is not None:
            return None
        last = self.attempts[-1] if self.attempts else None
        if self.exhausted is None and last is not None and last.kind == "user_error":
            self.exhausted = last.cause  # the user's to fix: another attempt would fail the same way
        elif self.exhausted is None and 0 <= self.max_failures < self.failures:
            self.exhausted = (f"max_failures={self.max_failures} exhausted: {self.failures} failed attempts "
                              f"(preemptions not counted); the last failed with: {last.cause}")
        if self.exhausted:
            return self.exhausted
        self.attempts.append(Attempt(number=len(self.attempts) + 1, start=now, world=world))
        return None

    def restored(self, step: int) -> None:
        """The current attempt resumes from ``step``: the previous one lost what it ran past it."""
        a = self.current
        if a is None:
            return
        a.start_step = a.last_step = step
        a.restored_at = time.time()
        prev = self.attempts[-2] if len(self.attempts) > 1 else None
        if prev is not None and prev.kind != "finished":
            prev.steps_lost = max(0, prev.last_step - step)

    def progress(self, step: int, now: float, committed_step: int | None = None) -> None:
        """A step reached. Also accepted for an attempt just failed: a surviving rank reports the step
        it reached as it fails, which may arrive after the controller closed the attempt."""
        a = self.current or (self.attempts[-1] if self.attempts and self.attempts[-1].kind != "finished" else None)
        if a is None:
            return
        if a.start_step is not None and step > a.start_step and a.first_step_at is None:
            a.first_step_at = now
        if step > a.last_step:
            a.last_step, a.last_step_at = step, now
        if committed_step is not None:
            a.committed_step = committed_step

    def end(self, now: float, kind: str, cause: str | None = None) -> None:
        """Close the current attempt: ``finished`` (rank 0's training function returned), or
        failed/preempted/user_error (Ray restarts the group). No default: the server decides from
        these kinds, so every caller says which one it means."""
        a = self.current
        if a is None:
            return
        a.end, a.kind, a.cause = now, kind, cause
        if kind == "finished":
            a.steps_lost = 0

    @property
    def user_error(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].kind == "user_error"

    def mark(self, **times: float) -> None:
        """Record when rank 0 entered the train loop (for the recovery breakdown)."""
        a = self.current
        if a is not None:
            for name, t in times.items():
                setattr(a, name, t)

    def to_dicts(self) -> list[dict]:
        return [{**asdict(a), "recovery_s": a.recovery_s} for a in self.attempts]


def describe_failure(worker_exceptions: dict[int, BaseException]) -> tuple[str, str]:
    """What ended an attempt: ``(cause, kind)``, kind one of preempted, user_error, failed.

    When one rank dies the others fail too (a collective's peer is gone), so the cause is chosen:
    a preemption first, then a user error (a bad spec value found on a worker), then a dead worker
    process, then the lowest rank's own exception.
    """
    from ray.exceptions import RayActorError

    from shipyard.errors import UserError
    from shipyard.runtime.preemption import Preempted
    from shipyard.runtime.ray_adapter import unwrap_worker_error

    errors = {rank: unwrap_worker_error(e) for rank, e in sorted(worker_exceptions.items())}
    for rank, e in errors.items():
        if isinstance(e, Preempted):
            return _clip(str(e)), "preempted"
    for rank, e in errors.items():
        if isinstance(e, UserError):
            return _clip(str(e)), "user_error"
    for rank, e in errors.items():
        if isinstance(e, RayActorError):
            if "its node has died" in str(e):
                return _clip(f"rank {rank}: its node died ({_node_death(e)})"), "failed"
            return _clip(f"rank {rank}: worker process died ({_first_line(e)})"), "failed"
    rank, e = next(iter(errors.items()))
    return _clip(f"rank {rank}: {type(e).__name__}: {_first_line(e)}"), "failed"


def _node_death(e: BaseException) -> str:
    """Ray's reason for a node's death (e.g. missed heartbeats), from the actor error's text."""
    lines = [line.strip() for line in str(e).splitlines()]
    for line in lines:
        if "node was terminated" in line:
            return line.removeprefix("the actor's ")
    return next((line.split(". Node Id")[0] for line in lines if "node has died" in line), _first_line(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CAUSE_CHARS else text[:MAX_CAUSE_CHARS - 1] + "…"


class AttemptsCallback(UserCallback):
    """Runs in Ray Train's controller: closes the attempt with its cause before the group restarts."""

    def __init__(self, board):
        self.board = board

    def after_exception(self, run_context, worker_exceptions) -> None:
        import ray

        cause, kind = describe_failure(worker_exceptions)
        # Waited on, so that the next attempt's ranks find this one closed when they ask admit().
        ray.get(self.board.attempt_failed.remote(cause, kind))
