"""Rank 0's progress publishing: what the driver's ``ProgressBoard`` and TensorBoard hear.

:class:`Publisher` owns the board handle, the push throttle, the reported metrics, the built-in
step meter and the TensorBoard rows. All of that belongs to the training loop's thread, which
calls every method but :meth:`Publisher.post`.

Rank 0's checkpoint upload thread only *posts* an event (a commit). Why a lock and not a queue
the loop drains: the board must hear of a commit within about a second even while the loop is
inside a long step, so the upload thread sends its event itself. It reads nothing of the loop's:
the event carries the position of the last push (at most ``PUSH_INTERVAL_S`` old) and its own
numbers only, and leaves those numbers in a hand-off list that the loop's next push takes into
its metrics and TensorBoard rows. The lock guards just that list, the last position and the order
of the board calls (so the step the board sees never goes back); the loop holds it only to send,
never while it reads a tensor, so the upload thread never waits for the GPU.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shipyard import storage
from shipyard.runtime.meter import MAX_PENDING_STEPS, StepMeter
from shipyard.runtime.tensorboard import EventWriter, to_floats

log = logging.getLogger(__name__)

# Rank 0 sends progress to the driver at most this often: an actor call costs about 1 ms of
# the training loop (measured in tests/bench/step_overhead.py), so once a second is ~0.1%.
PUSH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Position:
    step: int
    total: int  # steps when the data is exhausted
    epoch: int


class NonFiniteMetric(ArithmeticError):
    """A reported metric was NaN or infinite under ``nan_policy: fail``: the attempt fails."""


class Publisher:
    """Sends rank 0's progress to the board (other ranks only report :meth:`reached`).

    Reported values are read when pushed (at most once a second), and checked then against the
    job's ``nan_policy``: a NaN or infinite value fails the attempt (``fail``, naming the metric
    and the step it was reported at), is announced once per metric (``warn``), or passes
    (``ignore``; charts show a gap). A value that was non-finite only between two pushes is not seen.
    """

    def __init__(self, board, *, rank: int, position: Callable[[], Position], samples_per_step: int,
                 meter: StepMeter, nan_policy: str = "fail"):
        self._board, self._position, self.samples_per_step = board, position, samples_per_step
        self.meter = meter  # the loop stamps it; its aggregates ride on each push
        self._on = board is not None and rank == 0
        self._metrics: dict[str, Any] = {}
        self._reported_at: dict[str, int] = {}  # metric -> the step it was last reported at
        self.nan_policy = nan_policy
        self._warned: set[str] = set()
        self._last_push = 0.0
        self._tb: EventWriter | None = None
        self._tb_rows: deque = deque(maxlen=MAX_PENDING_STEPS)
        self._lock = threading.Lock()
        self._handed: list[tuple[int, dict[str, float]]] = []  # (step, numbers) posted, not yet pushed
        self._sent = position() if self._on else None  # the position of the last push

    # -- the loop's thread ----------------------------------------------------------------
    def open_tensorboard(self, writer: EventWriter) -> None:
        self._tb = writer

    def report(self, step: int, metrics: dict[str, Any]) -> None:
        """The user's metrics for ``step`` (tensors are read only when sent)."""
        self._metrics.update(metrics)
        self._reported_at.update(dict.fromkeys(metrics, step))
        if self._tb is not None:  # every report becomes a point; tensors are read in bulk at the push
            self._tb_rows.append((step, {k: v.detach() if isinstance(v, torch.Tensor) else v
                                         for k, v in metrics.items()}))
        self.push()

    def event(self, message: str, **extra) -> None:
        log.debug(message)
        self.push(force=True, event=message, **extra)

    def finished(self) -> None:
        """``train(ctx)`` returned and its last checkpoint is committed: the attempt is done."""
        self.push(force=True, event="finished")

    def push(self, force: bool = False, event: str | None = None, **extra) -> None:
        """Send the position and metrics, at most every ``PUSH_INTERVAL_S`` unless ``force``."""
        if not self._on:
            return
        now = time.monotonic()
        if not force and now - self._last_push < PUSH_INTERVAL_S:
            return
        self._last_push = now
        position = self._position()
        handed = self._take_handed()
        for _, numbers in handed:
            self._metrics.update(numbers)
        metrics = {k: _scalar(v) for k, v in self._metrics.items()}
        bad = self._non_finite(metrics)
        builtins = self.meter.flush()  # after the user's metrics: displays show those first
        metrics.update(builtins)
        if self._tb is not None:
            self._tensorboard(position.step, builtins, handed)
        retries = sum(storage.retry_counts().values())
        if retries:
            metrics["s3_retries"] = retries  # transient S3 errors this rank's reads and writes absorbed
        if bad and self.nan_policy == "warn":
            event = event or "; ".join(bad)
        with self._lock:
            self._sent = position
            self._send(position, metrics, event, extra)
        if bad and self.nan_policy == "fail":
            raise NonFiniteMetric(bad[0] + " (nan_policy: fail; with nan_policy: warn the job would train on)")

    def _non_finite(self, metrics: dict[str, Any]) -> list[str]:
        """``"loss is nan at step 37"`` for each user metric that is not finite (under ``warn``,
        each metric once)."""
        if self.nan_policy == "ignore":
            return []
        found = []
        for k, v in metrics.items():
            values = v if isinstance(v, list) else [v]
            for x in values:
                if isinstance(x, float) and not math.isfinite(x):
                    if self.nan_policy == "warn":
                        if k in self._warned:
                            break
                        self._warned.add(k)
                        log.warning("%s is %s at step %s (nan_policy: warn: training on)", k, x,
                                    self._reported_at.get(k))
                    found.append(f"{k} is {x} at step {self._reported_at.get(k)}"
                                 + (" (nan_policy: warn: training on)" if self.nan_policy == "warn" else ""))
                    break
        return found

    def close(self, *, flush: bool) -> None:
        """Stop writing TensorBoard files; with ``flush``, write the points not pushed yet first."""
        if self._tb is None:
            return
        if flush:
            self._tensorboard(self._position().step, self.meter.flush(), self._take_handed())
        self._tb.close()
        self._tb = None

    def _tensorboard(self, step: int, aggregates: dict[str, float], handed: list[tuple[int, dict[str, float]]]) -> None:
        """Hand the event writer this push's rows: per step, the built-in step clock and every
        report; at this step, the rates and GPU memory aggregated since the last push."""
        rows = self.meter.take_steps() + list(handed)
        reported = list(self._tb_rows)
        self._tb_rows.clear()
        rows += to_floats(reported)
        rates = {k: v for k, v in aggregates.items() if k not in ("step_time_s", "data_wait_s")}
        if rates:
            rows.append((step, rates))
        self._tb.add(rows)

    def _take_handed(self) -> list[tuple[int, dict[str, float]]]:
        with self._lock:
            handed, self._handed = self._handed, []
        return handed

    # -- any thread -----------------------------------------------------------------------
    def post(self, message: str, *, step: int, numbers: dict[str, float], **extra) -> None:
        """An event from another thread (a checkpoint commit), sent now; ``numbers`` (plain floats
        measured at ``step``) join the metrics and TensorBoard rows at the loop's next push."""
        log.debug(message)
        if not self._on:
            return
        with self._lock:
            self._handed.append((step, dict(numbers)))
            self._send(self._sent, dict(numbers), message, extra)

    def reached(self, step: int) -> None:
        """From any rank whose attempt is failing: the step it got to (rank 0's pushes are up to
        a second old). Waits at most 5 s; never raises."""
        if self._board is None:
            return
        import ray

        try:
            ray.get(self._board.reached.remote(step), timeout=5)
        except Exception as e:  # failing already; this is only bookkeeping
            log.debug("could not report the step reached: %s", e)

    def _send(self, p: Position, metrics: dict, event: str | None, extra: dict) -> None:
        self._board.update.remote(step=p.step, total=p.total, epoch=p.epoch, samples_per_step=self.samples_per_step,
                                  metrics=metrics, event=event, **extra)


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().tolist()
    return v
