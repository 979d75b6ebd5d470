"""Live progress: rank 0 pushes to a ProgressBoard actor; the driver polls it and draws.

The board is a zero-CPU Ray actor, so it never takes a slot from training workers, and the
push is fire-and-forget (throttled in the context), so it costs the training loop nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict = {"step": 0, "total": 0, "epoch": 0, "metrics": {}, "samples_per_step": 0}
        self.events: list[tuple[float, str]] = []
        self.attempts: list[dict] = []
        self.checkpoint: str | None = None

    def update(self, *, step, total, epoch, samples_per_step, metrics, event=None, checkpoint=None) -> None:
        self.state.update(step=step, total=total, epoch=epoch, samples_per_step=samples_per_step,
                          updated=time.time())
        self.state["metrics"].update(metrics)
        if checkpoint:
            self.checkpoint = checkpoint
        if event == "started":
            self.attempts.append({"start": time.time(), "start_step": step})
        elif event:
            self.events.append((time.time(), event))

    def snapshot(self) -> dict:
        return {**self.state, "events": list(self.events), "attempts": list(self.attempts),
                "checkpoint": self.checkpoint}


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
