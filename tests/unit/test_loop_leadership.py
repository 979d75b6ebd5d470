"""The scheduler loop ticks only while its server holds the scheduler lock, and reconciles each
time it takes the lock (another server may have scheduled meanwhile)."""

from __future__ import annotations

import threading

import shipyard.scheduler.loop as loop_mod
from shipyard.scheduler.loop import SchedulerLoop


class Scripted:
    """A lock whose ``try_acquire`` answers from a script; stops the loop when it runs out."""

    def __init__(self, answers: list[bool], stop: threading.Event):
        self.answers, self.stop, self.held = list(answers), stop, False

    def try_acquire(self) -> bool:
        self.held = self.answers.pop(0)
        if not self.answers:
            self.stop.set()
        return self.held

    def release(self) -> None:
        self.held = False

    def describe(self) -> str:
        return "scripted"


def test_ticks_only_while_leading_and_reconciles_on_every_takeover(monkeypatch):
    monkeypatch.setattr(loop_mod, "LEADER_RETRY_S", 0.001)
    stop = threading.Event()
    lock = Scripted([False, True, True, False, False, True, True], stop)
    loop = SchedulerLoop(store=None, backend=None, interval_s=0.001, leadership=lock)
    calls: list[str] = []
    monkeypatch.setattr(loop, "reconcile", lambda: calls.append("reconcile"))
    monkeypatch.setattr(loop, "tick", lambda: calls.append("tick"))
    ticks: list[float] = []
    loop.on_tick = lambda s, d: ticks.append(s)
    loop.run(stop)
    assert calls == ["reconcile", "tick", "tick", "reconcile", "tick", "tick"]
    assert len(ticks) == 4  # a standby's retries are not scheduler ticks


def test_a_loop_without_a_lock_is_the_sole_scheduler():
    loop = SchedulerLoop(store=None, backend=None)
    assert loop.leadership.try_acquire() and loop.leadership.held
