"""Live progress: rank 0 pushes to a ProgressBoard actor; the driver polls it and draws.

The board is a zero-CPU Ray actor, so it never takes a slot from training workers, and the
push is fire-and-forget (throttled in the context), so it costs the training loop nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from shipyard.runtime.attempts import Ledger
from shipyard.runtime.watchdog import Beat, Stall, beat, find_stall

# A rank whose process group broke has this long to leave it before its process is made to exit.
LEAVE_GRACE_S = 10.0


class Board:
    """The driver-side record of a run: progress, events, attempts (see ``attempts.py``), the
    process-group generations (``regroup.py``) and the ranks' heartbeats (``watchdog.py``). Plain
    Python; the run uses it as the :data:`ProgressBoard` actor. Every method is quick."""

    def __init__(self, max_failures: int = 0, world: int = 1, stall_timeout_s: float | None = None) -> None:
        self.state: dict = {"step": 0, "total": 0, "epoch": 0, "metrics": {}, "samples_per_step": 0}
        self.events: list[tuple[float, str]] = []
        self.ledger = Ledger(max_failures)
        self.world, self.stall_timeout_s = world, stall_timeout_s
        self.beats: dict[int, Beat] = {}
        self.stall: Stall | None = None
        self.checkpoint: str | None = None
        self.generation = Generation()

    # -- process-group generations (see runtime/regroup.py) -------------------------------
    def join(self, rank: int, world: int, master: tuple[str, int] | None) -> int:
        """A rank is ready for a process group of ``world`` ranks (rank 0 brings the address the
        group meets at). Returns the generation it joined; poll :meth:`formed` with it."""
        g = self.generation
        if g.state == "formed":  # a rank back from a generation that looked healthy: it broke
            self._break(f"rank {rank} left the process group")
        if g.state == "broken":
            g.start_forming(world, time.time())
        if g.state == "forming":
            g.members[rank] = master
            if len(g.members) >= g.world:
                self._form()
        return g.number

    def formed(self, number: int) -> dict | None:
        """None while generation ``number`` is forming; else where its ranks meet, or why they don't."""
        g = self.generation
        if number != g.number or g.state == "broken":
            return {"superseded": True}
        if g.state == "refused":
            return {"refused": self.ledger.exhausted}
        if g.state == "formed":
            return {"master": g.members[0]}
        return None

    def broken(self, number: int, rank: int, cause: str) -> None:
        """From a rank that lost a peer in generation ``number`` and stays to form the next one."""
        if number == self.generation.number and self.generation.state == "formed":
            self._break(f"rank {rank}: {cause}")

    def _break(self, cause: str) -> None:
        g = self.generation
        if g.state == "formed":
            g.state, g.cause, g.broken_at = "broken", cause, time.time()

    def _form(self) -> None:
        """Every rank joined: the attempt before ends (if no one said why: a broken process group),
        and this one is admitted, or refused once max_failures is spent."""
        g = self.generation
        if self.ledger.current is not None:
            self.ledger.end(g.forming_since, "failed", g.cause or "the process group broke")
        if self.ledger.admit(g.forming_since, g.world):
            g.state = "refused"
            return
        g.state = "formed"
        self.ledger.mark(entered=time.time())
        self.beats, self.stall = {}, None
        self.world = g.world

    def update(self, *, step, total, epoch, samples_per_step, metrics, event=None, checkpoint=None,
               committed_step=None) -> None:
        now = time.time()
        self.state.update(step=step, total=total, epoch=epoch, samples_per_step=samples_per_step, updated=now)
        self.state["metrics"].update(metrics)
        if checkpoint:
            self.checkpoint = checkpoint
        if event == "started":
            self.ledger.restored(step)
        self.ledger.progress(step, now, committed_step)
        if event == "finished":
            self.ledger.end(now, "finished")
        elif event and event != "started":
            self.events.append((now, event))

    def reached(self, step: int) -> None:
        """From a rank whose attempt is failing: the step it got to (for steps lost)."""
        self.ledger.progress(step, time.time())

    def attempt_failed(self, cause: str, kind: str) -> None:
        """From Ray Train's controller (``AttemptsCallback``), before it replaces workers."""
        self._break(cause)
        current = self.ledger.current
        if current is None:
            return
        if self.stall is not None:  # a rank exited because it stalled: say so, not just "process died"
            cause, kind = self.stall.message, "failed"
        self.ledger.end(time.time(), kind, cause)
        self.events.append((time.time(), f"attempt {current.number} ended: {cause}"))

    def heartbeat(self, rank: int, step: int, busy: bool, generation: int | None = None) -> Stall | None:
        now = time.time()
        g = self.generation
        left_behind = generation is not None and (generation < g.number or g.state == "broken")
        if left_behind and g.broken_at is not None:
            # This rank's process group broke, but its loop has not left it: it waits in a collective
            # for the lost peer (NCCL does not fail one). Its process exits, so it is replaced too.
            if now - g.broken_at < LEAVE_GRACE_S:
                return None
            message = (f"rank {rank} was still in process group {generation} {now - g.broken_at:.0f}s after it "
                       f"broke (waiting for a lost peer); its process exits so that it is replaced")
            self.events.append((now, message))
            return Stall((rank,), False, message)
        if self.ledger.current is None or not self.stall_timeout_s:
            return None
        self.beats[rank] = beat(self.beats.get(rank), step, busy, now)
        if self.stall is None:
            self.stall = find_stall(self.beats, self.world, now, self.stall_timeout_s)
            if self.stall is not None:
                self.events.append((now, self.stall.message))
        return self.stall

    def snapshot(self) -> dict:
        return {**self.state, "events": list(self.events), "attempts": self.ledger.to_dicts(),
                "exhausted": self.ledger.exhausted, "user_error": self.ledger.user_error, "checkpoint": self.checkpoint}


ProgressBoard = ray.remote(num_cpus=0)(Board)


@dataclass
class Generation:
    """One process group of the run: formed once every rank joined, broken when one is lost."""

    number: int = -1
    state: str = "broken"  # forming | formed | broken | refused (no attempt may start: max_failures)
    world: int = 0
    members: dict = field(default_factory=dict)  # rank -> None, or rank 0's (address, port)
    forming_since: float = 0.0
    cause: str | None = None  # why the last formed generation broke, as a rank saw it
    broken_at: float | None = None  # when the last formed generation broke

    def start_forming(self, world: int, now: float) -> None:
        self.number += 1
        self.state, self.world, self.members, self.forming_since = "forming", world, {}, now


@dataclass
class Rate:
    """Steps per second over a sliding window of (time, step) samples."""

    window_s: float = 10.0
    points: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, step: int) -> None:
        if self.points and step < self.points[-1][1]:
            self.points.clear()  # a restart went back to a checkpoint
        self.points.append((t, step))
        while len(self.points) > 2 and t - self.points[0][0] > self.window_s:
            self.points.pop(0)

    @property
    def per_second(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None
