"""TensorBoard event files from rank 0 (``metrics: {tensorboard: true}``).

The training loop only appends plain ``(step, {name: float})`` rows to a queue; a thread of its
own imports the writer, builds the protobufs and writes the files, so a slow disk or the import
itself never holds a step. ``SummaryWriter``'s own queue blocks its caller when full, which is
why it is not called from the loop.

Every attempt opens a new event file in the same directory with ``purge_step`` = the step it
resumed from + 1: TensorBoard then drops the points a failed attempt wrote past its last
checkpoint (the steps that ran twice), so a curve shows each step once across restarts and
resumed runs. A failed write is logged once and training goes on.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from pathlib import Path

import torch

from shipyard.config import Settings
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)
FLUSH_S = 5.0


def log_dir(spec: JobSpec, env: dict[str, str] | None = None) -> Path:
    """``metrics.tensorboard_dir``, else ``<SHIPYARD_HOME>/tensorboard/<job name>``."""
    if spec.metrics.tensorboard_dir:
        return Path(spec.metrics.tensorboard_dir)
    return Settings.from_env(env).home / "tensorboard" / spec.name


def to_floats(rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Reported values as Python numbers. Scalar tensors on one GPU are stacked and copied in one
    transfer, so a second's worth of per-step losses costs one device sync, not one per step."""
    cuda = [v for _, values in rows for v in values.values()
            if isinstance(v, torch.Tensor) and v.is_cuda and v.numel() == 1]
    read: dict[int, float] = {}
    if cuda:
        try:
            read = dict(zip(map(id, cuda), torch.stack([v.reshape(()).float() for v in cuda]).tolist()))
        except RuntimeError:  # on several devices: one at a time
            read = {id(v): v.float().item() for v in cuda}
    out = []
    for step, values in rows:
        clean = {}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = read[id(v)] if id(v) in read else v.float().item()
            if isinstance(v, (int, float)):
                clean[k] = v
        if clean:
            out.append((step, clean))
    return out


class EventWriter:
    def __init__(self, directory: Path, *, resumed_step: int = 0):
        self.directory, self.purge_step = Path(directory), resumed_step + 1
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="shipyard-tensorboard", daemon=True)
        self._thread.start()

    def add(self, rows: list[tuple[int, dict]]) -> None:
        """Queue rows of scalars; values that are not finite numbers are skipped (TensorBoard
        would draw a NaN loss as a spike to nothing; the gap in the server's chart says it)."""
        if rows and not self._failed:
            self._queue.put(rows)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and close the file (waits at most ``timeout`` seconds)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.directory, exist_ok=True)
            writer = SummaryWriter(str(self.directory), purge_step=self.purge_step, flush_secs=FLUSH_S)
        except Exception as e:  # noqa: BLE001 - event files are a convenience; training goes on
            self._fail(e)
            return
        try:
            while (rows := self._queue.get()) is not None:
                for step, values in rows:
                    for name, v in values.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                            writer.add_scalar(name, v, step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        finally:
            writer.close()

    def _fail(self, e: Exception) -> None:
        self._failed = True
        log.warning("TensorBoard event files in %s: %s; no more are written for this attempt", self.directory, e)
        while True:  # unblock close(): drain what was queued
            try:
                if self._queue.get_nowait() is None:
                    return
            except queue.Empty:
                return
