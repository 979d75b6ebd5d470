"""Step-boundary agreement: do all ranks checkpoint at this step, and did any rank get SIGTERM?

Ranks must agree on both, or the collective save deadlocks. ``every_steps`` is the same
arithmetic on every rank; ``every_seconds`` clocks and SIGTERM notices are compared in one tiny
element-wise MAX all-reduce (on a gloo group of its own, see :func:`max_over_ranks`). That costs
milliseconds on a busy machine, so it runs about once every ``AGREE_EVERY_S``: each agreement also
settles the number of steps until the next one, from the step time the ranks measured.

:class:`StepAgreement` is owned by the training loop's thread. The all-reduce, the clock and the
SIGTERM notice are injected, so its decisions are tested without a process group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shipyard.runtime import preemption

AGREE_EVERY_S = 1.0  # ranks compare clocks and notices about this often
MAX_INTERVAL = 1000  # steps between two agreements, at most (a notice waits at most this long)

Reduce = Callable[[list[int]], list[int]]  # element-wise MAX of every rank's list


@dataclass(frozen=True)
class Decision:
    """What every rank does at a step boundary (the same on all ranks)."""

    checkpoint: bool  # save at this step
    noticed: int = -1  # the highest rank that received SIGTERM, or -1

    @property
    def preempted(self) -> bool:
        return self.noticed >= 0


def interval(steps: int, seconds: float) -> int:
    """Steps until the next agreement: ``AGREE_EVERY_S`` worth at the measured pace, 1..MAX_INTERVAL."""
    if steps <= 0 or seconds <= 0:
        return 1
    return max(1, min(MAX_INTERVAL, int(AGREE_EVERY_S * steps / seconds)))


class StepAgreement:
    """One rank's side of the agreement. Call :meth:`decide` at every step boundary, on every rank."""

    def __init__(self, *, rank: int, every_steps: int | None, every_seconds: float | None, reduce: Reduce,
                 since: float | None = None, clock: Callable[[], float] = time.monotonic,
                 notice: Callable[[], bool] = preemption.requested):
        self.rank, self.every_steps, self.every_seconds = rank, every_steps, every_seconds
        self._reduce, self._clock, self._notice = reduce, clock, notice
        start = clock() if since is None else since  # the every_seconds clock starts with the context
        self._agree_at = self._agreed_step = 0  # the next agreement's step; the last one's
        self._agreed_time = self._saved_time = start

    def restored(self, step: int) -> None:
        """The run resumed at ``step``: the next agreement is there."""
        self._agree_at = self._agreed_step = step

    def saved(self) -> None:
        """A checkpoint was just taken: restart the ``every_seconds`` clock."""
        self._saved_time = self._clock()

    def decide(self, step: int, *, saved_step: int | None) -> Decision:
        """Collective when an agreement is due (``reduce``); ``saved_step``: the last checkpoint's
        step (no second save there, and none at step 0)."""
        due = bool(self.every_steps and step % self.every_steps == 0)
        noticed = -1
        if step >= self._agree_at:
            now = self._clock()
            mine = [int(self.every_seconds is not None and now - self._saved_time >= self.every_seconds),
                    self.rank + 1 if self._notice() else 0,
                    interval(step - self._agreed_step, now - self._agreed_time)]
            seconds_due, notice, steps = (int(v) for v in self._reduce(mine))
            due = due or bool(seconds_due)
            noticed = notice - 1
            self._agree_at, self._agreed_step, self._agreed_time = step + steps, step, now
        return Decision(checkpoint=(due or noticed >= 0) and step not in (0, saved_step), noticed=noticed)


def max_over_ranks(group) -> Reduce:
    """The production ``reduce``: one all-reduce (MAX) over ``group`` (gloo: CPU tensors)."""
    import torch
    import torch.distributed as dist

    def reduce(values: list[int]) -> list[int]:
        flags = torch.tensor(values)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        return flags.tolist()

    return reduce


def preempted_message(noticed: int, step: int) -> str:
    """The event (and the :class:`~shipyard.runtime.preemption.Preempted` message) once the
    preemption checkpoint is committed."""
    why = preemption.reason() if preemption.requested() else "received SIGTERM"
    return f"preempted: rank {noticed} {why}; checkpoint at step {step} committed, the job restarts from it"
