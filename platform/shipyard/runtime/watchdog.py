"""Hung-rank detection: a rank that makes no progress for ``stall_timeout_s`` fails the attempt.

A rank stuck outside a collective (a deadlocked data loader, a sleep, a hung filesystem) leaves
every other rank waiting inside the next collective, and gloo/NCCL wait for their own timeout
(30 minutes by default) without saying who is to blame. Instead, every rank runs a small thread
that sends its step to the driver's ``ProgressBoard`` every few seconds; the board, which sees all
ranks, decides (:func:`find_stall`): when no rank has advanced for ``stall_timeout_s``, the rank
that is furthest behind is the one the others wait for. That rank exits its process, with the
message recorded as the attempt's cause; Ray Train sees the worker die and restarts the group from
the last committed checkpoint. If the culprit's own thread no longer answers (a frozen process),
every rank exits instead.

A rank is armed once it has finished a step in the current attempt, so start-up (imports,
compilation, the checkpoint load) never counts, and time spent waiting for a checkpoint commit
counts as progress.

The same thread gets a rank out of a process group that broke while the rank is stuck in one of
its collectives (NCCL does not fail a collective when a peer dies; gloo does, at once): once the
board has known of the break for ``LEAVE_GRACE_S``, the rank's process exits and is replaced
(see ``regroup.py``). This runs whether or not ``stall_timeout_s`` is set.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

STALL_EXIT_CODE = 75  # what a stalled rank's process exits with (EX_TEMPFAIL: retry may succeed)


@dataclass
class Beat:
    step: int
    changed_at: float | None  # when the step last advanced (None: not armed yet)
    seen_at: float  # when this rank's watchdog last reported


@dataclass(frozen=True)
class Stall:
    culprits: tuple[int, ...]  # the ranks the others wait for
    frozen: bool  # a culprit's watchdog stopped answering: every rank must exit
    message: str


def beat(previous: Beat | None, step: int, busy: bool, now: float) -> Beat:
    """Fold one report into a rank's record. ``busy``: inside a platform wait (checkpoint commit)."""
    if previous is None:
        return Beat(step, None, now)
    changed = busy or step != previous.step
    armed = previous.changed_at is not None or step != previous.step
    return Beat(step, now if changed and armed else previous.changed_at, now)


def find_stall(beats: dict[int, Beat], world: int, now: float, timeout: float) -> Stall | None:
    """Whether the attempt is stalled: every rank armed and none advanced for ``timeout`` seconds."""
    if len(beats) < world or any(b.changed_at is None for b in beats.values()):
        return None
    if any(now - b.changed_at < timeout for b in beats.values()):
        return None
    behind = min(b.step for b in beats.values())
    culprits = tuple(sorted(r for r, b in beats.items() if b.step == behind))
    # A watchdog reports every timeout/4 at most; silence for a whole timeout means a frozen process.
    frozen = any(now - beats[r].seen_at >= timeout for r in culprits)
    others = ", ".join(f"rank {r} at step {b.step}" for r, b in sorted(beats.items()) if r not in culprits)
    who = " and ".join(f"rank {r}" for r in culprits)
    message = (f"stalled: {who} made no progress for {timeout:g}s (last step {behind})"
               + (f"; the others waited for it ({others})" if others else "")
               + ("; its process stopped answering" if frozen else ""))
    return Stall(culprits, frozen, message)


class Watchdog:
    """The per-rank thread: report the step, exit the process if the board names this rank."""

    def __init__(self, board, rank: int, timeout: float | None, step: Callable[[], int], busy: Callable[[], bool],
                 generation: int | None = None):
        self.board, self.rank, self.timeout, self.generation = board, rank, timeout, generation
        self._step, self._busy = step, busy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shipyard-watchdog", daemon=True)

    @property
    def interval(self) -> float:
        return max(0.2, min(5.0, self.timeout / 4)) if self.timeout else 5.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import ray

        while True:  # the first report is immediate: it holds the step this attempt starts from
            try:
                stall = ray.get(self.board.heartbeat.remote(self.rank, self._step(), self._busy(), self.generation),
                                timeout=self.timeout or 30.0)
            except Exception as e:  # the driver is gone or busy: not this rank's failure
                log.debug("watchdog heartbeat failed: %s", e)
                stall = None
            if stall is not None and not self._stop.is_set() and (self.rank in stall.culprits or stall.frozen):
                log.error("%s; exiting so that the job restarts from its last checkpoint", stall.message)
                os._exit(STALL_EXIT_CODE)
            if self._stop.wait(self.interval):
                return
