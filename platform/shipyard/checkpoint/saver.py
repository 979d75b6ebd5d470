"""The Checkpointer: when a rank's training loop saves, what it waits for, and what runs behind it.

An asynchronous save blocks the loop only while the state is copied into CPU memory (DCP's
``DefaultStager``, which reuses its buffers from one save to the next); writing the files,
gathering every rank's data position and committing run on one upload thread per rank, while
training goes on. The next save first waits for the previous upload, so at most one checkpoint
is in flight and staging never overwrites buffers still being read. A rank that dies during an
upload leaves a directory without ``COMMIT.json``, which ``latest()`` ignores and the next prune
removes: earlier checkpoints are never touched by a save.

Why not ``dcp.async_save``: it uploads in the background too, but the commit must follow the
upload on the same thread, after every rank finished, so the upload thread here runs the whole
:func:`~shipyard.checkpoint.dcp.write` (DCP save, gather, commit, prune) in order. Its collectives
use a gloo group of their own: collectives from two threads on the training group would interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from shipyard.checkpoint import dcp
from shipyard.checkpoint.store import CheckpointStore, CommitRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """What rank 0 learns when a checkpoint is committed."""

    record: CommitRecord
    blocked_s: float   # the training loop's time inside save()
    total_s: float     # from save() until COMMIT.json was written


class Checkpointer:
    """Saves one job's checkpoints from every rank. Construct and call collectively (all ranks)."""

    def __init__(self, store: CheckpointStore, *, strategy: str, keep_last: int | None,
                 async_upload: bool = True, on_commit: Callable[[Saved], None] | None = None):
        self.store, self.strategy, self.keep_last = store, strategy, keep_last
        self.async_upload, self.on_commit = async_upload, on_commit
        self._pending: tuple[int, Future] | None = None
        self._group = self._stager = self._pool = None
        if async_upload:
            self._group = dist.new_group(backend="gloo")
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shipyard-checkpoint-upload")

    def save(self, *, step: int, epoch: int, model, optimizer, scheduler=None, data_state: dict) -> float:
        """Checkpoint at ``step`` (collective). Returns the seconds the caller was blocked."""
        t0 = time.monotonic()
        self.wait()
        if dist.get_rank() == 0:
            self.store.clear(step)  # leftovers of a save that crashed before committing
        dist.barrier()
        state = dcp.app_state(model, optimizer, scheduler)
        rank_state = {"data": data_state, "rng": dcp.rng_state()}
        if not self.async_upload:
            self._write(step, epoch, state, rank_state, t0, t0)
            return time.monotonic() - t0
        staged = self._stager.stage(state)
        blocked_until = time.monotonic()
        self._pending = (step, self._pool.submit(self._write, step, epoch, staged, rank_state, t0, blocked_until))
        return blocked_until - t0

    def _write(self, step, epoch, state, rank_state, t0, blocked_until) -> None:
        record = dcp.write(self.store, step=step, epoch=epoch, state=state, rank_state=rank_state,
                           strategy=self.strategy, keep_last=self.keep_last, group=self._group)
        if record is not None and self.on_commit is not None:
            try:
                self.on_commit(Saved(record, blocked_until - t0, time.monotonic() - t0))
            except Exception:  # reporting must never fail a committed checkpoint
                log.exception("checkpoint at step %d committed, but reporting it failed", step)

    def wait(self) -> None:
        """Block until the checkpoint in flight (if any) is committed; re-raise its failure."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as e:
            raise RuntimeError(f"checkpoint at step {step} to {self.store.uri_for(step)} failed: "
                               f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Wait for the upload in flight, then free the staging buffers and the upload thread."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._pool.shutdown(wait=False)
