"""The ledger of a run's attempts, and the failure budget they spend.

Ray Train restarts the worker group after a failure; shipyard records each of those starts as an
attempt (start, end, kind, cause, the step it resumed from, the last step it reached, the last step
it committed, steps lost) so that a user can see what happened, and decides itself whether another
attempt is allowed. Ray's own budget (``FailureConfig.max_failures``) counts every worker-group
error alike, but a preemption (SIGTERM -> checkpoint -> restart) loses no work and must not use up
``max_failures`` -- on a spot fleet it would end a healthy job. So Ray is told to retry without
limit, and the ledger decides: :meth:`Ledger.refusal` (asked by the controller's callback right
after a failure, so that no worker group is started for nothing, and by :meth:`Ledger.admit` when
every rank of a new group has joined) refuses once failures other than preemptions exceed
``max_failures``, after a user error, and after the same error at the same step twice in a row
(deterministic: another attempt would fail the same way) unless ``retry_repeated`` is set.

Plain data with no clock of its own (time is an argument), kept inside the driver's Board actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard.run.records import MAX_CAUSE_CHARS, AttemptKind, AttemptRecord


@dataclass
class Ledger:
    max_failures: int  # -1: unlimited
    retry_repeated: bool = False  # retry an attempt that failed exactly like the one before it
    attempts: list[AttemptRecord] = field(default_factory=list)
    exhausted: str | None = None  # set when admit() refused another attempt

    @property
    def current(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].open else None

    @property
    def failures(self) -> int:
        """Ended attempts that count against ``max_failures`` (preemptions do not)."""
        return sum(1 for a in self.attempts if a.kind is not None and a.kind.counts_as_failure)

    @property
    def user_error(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].kind is AttemptKind.USER_ERROR

    def refusal(self) -> str | None:
        """Why no further attempt may start, or None; once set it stays (``exhausted``)."""
        if self.exhausted is None:
            self.exhausted = self._refusal()
        return self.exhausted

    def _refusal(self) -> str | None:
        ended = [a for a in self.attempts if not a.open]
        last = ended[-1] if ended else None
        if last is None:
            return None
        if last.kind is AttemptKind.USER_ERROR:
            return last.cause  # the user's to fix: another attempt would fail the same way
        if 0 <= self.max_failures < self.failures:
            return (f"max_failures={self.max_failures} exhausted: {self.failures} failed attempts "
                    f"(preemptions not counted); the last failed with: {last.cause}")
        before = ended[-2] if len(ended) > 1 else None
        if not self.retry_repeated and before is not None and repeats(before, last):
            return (f"not retried: attempts {before.number} and {last.number} failed the same way at step "
                    f"{last.last_step} ({last.cause}); another attempt would too "
                    "(retry_repeated_errors: true retries it anyway)")
        return None

    def admit(self, now: float, world: int | None = None) -> str | None:
        """Open an attempt (once per worker-group start). Returns why not, if not."""
        if self.current is not None:
            return None
        if self.refusal():
            return self.exhausted
        self.attempts.append(AttemptRecord(number=len(self.attempts) + 1, start=now, world=world))
        return None

    def restored(self, step: int, now: float) -> None:
        """The current attempt resumes from ``step``: the previous one lost what it ran past it."""
        a = self.current
        if a is None:
            return
        a.start_step = a.last_step = step
        a.restored_at = now
        prev = self.attempts[-2] if len(self.attempts) > 1 else None
        if prev is not None and prev.kind is not AttemptKind.FINISHED:
            prev.steps_lost = max(0, prev.last_step - step)

    def progress(self, step: int, now: float, committed_step: int | None = None) -> None:
        """A step reached. Also accepted for an attempt just failed: a surviving rank reports the step
        it reached as it fails, which may arrive after the controller closed the attempt."""
        last = self.attempts[-1] if self.attempts else None
        a = self.current or (last if last is not None and last.kind is not AttemptKind.FINISHED else None)
        if a is None:
            return
        if a.start_step is not None and step > a.start_step and a.first_step_at is None:
            a.first_step_at = now
        if step > a.last_step:
            a.last_step, a.last_step_at = step, now
        if committed_step is not None:
            a.committed_step = committed_step

    def end(self, now: float, kind: AttemptKind, cause: str | None = None, error: str | None = None) -> None:
        """Close the current attempt. No default kind: the server decides from it, so every caller
        says which one it means."""
        a = self.current
        if a is None:
            return
        a.end, a.kind, a.cause, a.error = now, AttemptKind(kind), clip(cause), clip(error)
        if a.kind is AttemptKind.FINISHED:
            a.steps_lost = 0

    def entered(self, now: float) -> None:
        """Rank 0 entered the train loop (the process group is up): for the recovery breakdown."""
        if self.current is not None:
            self.current.entered = now


def repeats(before: AttemptRecord, last: AttemptRecord) -> bool:
    """Whether ``last`` failed as ``before`` did: both failed at the same step with the same
    Python exception and message, whichever rank raised it. A dead process or node, a stall or a
    preemption is not an exception of the job's own and is retried as usual."""
    return (before.kind is last.kind is AttemptKind.FAILED and before.last_step == last.last_step
            and before.error is not None and before.error == last.error)


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_CAUSE_CHARS:
        return text
    return text[:MAX_CAUSE_CHARS - 1] + "…"
