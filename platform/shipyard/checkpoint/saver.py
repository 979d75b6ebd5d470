"""The Checkpointer: when a rank's training loop saves, what it waits for, and what runs behind it.

An asynchronous save copies the state into CPU memory (DCP's ``DefaultStager``, which reuses its
buffers from one save to the next; pinned on GPU) and returns. What only ``optimizer.step``
changes -- the optimizer's state (for AdamW two thirds of the bytes) and the parameters it steps
-- is copied on a staging thread while the next forward and backward run, and a pre-step hook
on the optimizer waits for that copy first. The rest (buffers, which a forward pass may change,
parameters the optimizer does not step, the scheduler, the param groups) is copied before
``save()`` returns; it is a few MB in most models. (Code that changes parameters in place outside
``optimizer.step``, between a save and the next step, would leak into that checkpoint.) Writing
the files, gathering every rank's data position and committing run on one upload thread per
rank, while training goes on. The next save first waits for the previous upload, so at most one
checkpoint is in flight and staging never overwrites buffers still being read. A rank that dies
during an upload leaves a directory without ``COMMIT.json``, which ``latest()`` ignores and the
next prune removes: earlier checkpoints are never touched by a save.

Why not ``dcp.async_save``: it uploads in the background too, but the commit must follow the
upload on the same thread, after every rank finished, so the upload thread here runs the whole
:func:`~shipyard.checkpoint.dcp.write` (DCP save, gather, commit, prune) in order. Its collectives
use a gloo group of their own: collectives from two threads on the training group would interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor

from shipyard.checkpoint import dcp
from shipyard.checkpoint.store import CheckpointStore, CommitRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """What rank 0 learns when a checkpoint is committed."""

    record: CommitRecord
    blocked_s: float   # the training loop's time inside save() and waiting in optimizer.step for the copy
    total_s: float     # from save() until COMMIT.json was written (the prune after it not counted)


class Checkpointer:
    """Saves one job's checkpoints from every rank. Construct and call collectively (all ranks)."""

    def __init__(self, store: CheckpointStore, *, strategy: str, keep_last: int | None,
                 async_upload: bool = True, on_commit: Callable[[Saved], None] | None = None):
        self.store, self.strategy, self.keep_last = store, strategy, keep_last
        self.async_upload, self.on_commit = async_upload, on_commit
        self._pending: tuple[int, Future] | None = None
        self._staging: Future | None = None  # the copy of what optimizer.step changes, in flight
        self._step_wait_s = 0.0               # time optimizer.step waited for it, this checkpoint
        self._hooks: dict[int, object] = {}   # id(optimizer) -> pre-step hook handle
        self._group = self._stager = self._background_stager = self._pool = None
        if async_upload:
            self._group = dist.new_group(backend="gloo")
            cuda = torch.cuda.is_available()
            options = dict(use_pinned_memory=cuda, use_shared_memory=False, use_non_blocking_copy=cuda)
            self._stager = DefaultStager(StagingOptions(use_async_staging=False, **options))
            self._background_stager = DefaultStager(StagingOptions(use_async_staging=True, **options))
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shipyard-checkpoint-upload")

    def save(self, *, step: int, epoch: int, data_state: dict, model=None, optimizer=None, scheduler=None,
             parts: list[dcp.Part] | None = None, tensors: dict | None = None, record: dict | None = None) -> float:
        """Checkpoint at ``step`` (collective). Returns the seconds the caller was blocked in here.

        ``parts``: every prepared part; ``model``/``optimizer``/``scheduler`` are the one unnamed
        part, for a caller with a single model. ``tensors``: ``ctx.state``'s tensors (copied here,
        with the rest that is not only changed by ``optimizer.step``). ``record``: extra fields of
        the commit record (see :func:`~shipyard.checkpoint.dcp.write`)."""
        parts = parts if parts is not None else [dcp.Part("", model, optimizer, scheduler)]
        t0 = time.monotonic()
        self.wait()
        if dist.get_rank() == 0:
            self.store.clear(step)  # leftovers of a save that crashed before committing
        dist.barrier()
        state = dcp.app_state(parts, tensors)
        rank_state = {"data": data_state, "rng": dcp.rng_state()}
        if not self.async_upload:
            self._write(step, epoch, state, None, rank_state, t0, None, record)
            return time.monotonic() - t0
        # What only optimizer.step changes, per part, goes to the background copy.
        background = {}
        for p in parts:
            mine = dcp.part_of(state, p.name)
            stepped = _stepped_keys(mine["model"], p.optimizer)
            background[p.name] = {"optim": mine["optim"].pop("state"),
                                  "model": {k: v for k, v in mine["model"].items() if k in stepped}}
            mine["model"] = {k: v for k, v in mine["model"].items() if k not in stepped}
        staged = self._stager.stage(state)
        self._step_wait_s = 0.0
        self._staging = self._background_stager.stage(background)
        for p in parts:
            self._hook(p.optimizer)
        blocked_until = time.monotonic()
        self._pending = (step, self._pool.submit(self._write, step, epoch, staged, self._staging, rank_state,
                                                 t0, blocked_until, record))
        return blocked_until - t0

    def _hook(self, optimizer) -> None:
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        staging, self._staging = self._staging, None
        if staging is not None and not staging.done():
            t0 = time.monotonic()
            futures.wait([staging])  # a failed copy is raised by the upload thread, not here
            self._step_wait_s += time.monotonic() - t0

    def _write(self, step, epoch, state, background_staging, rank_state, t0, blocked_until, extra) -> None:
        if background_staging is not None:
            for name, moved in background_staging.result().items():
                mine = dcp.part_of(state, name)
                mine["optim"]["state"] = moved["optim"]
                mine["model"] = {**moved["model"], **mine["model"]}
        committed_at = []
        record = dcp.write(self.store, step=step, epoch=epoch, state=state, rank_state=rank_state,
                           strategy=self.strategy, keep_last=self.keep_last, group=self._group, record=extra,
                           committed=lambda _: committed_at.append(time.monotonic()))
        if record is not None and self.on_commit is not None:
            now = time.monotonic()
            blocked = (now if blocked_until is None else blocked_until) - t0 + self._step_wait_s  # None: synchronous
            try:
                self.on_commit(Saved(record, blocked, committed_at[0] - t0))
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
            self._free()

    def abandon(self, timeout_s: float = 10.0) -> None:
        """After a failure: give the upload in flight ``timeout_s`` to end (a lost rank fails its
        collectives, so it cannot commit), ignore how it ended, and free everything."""
        if self._pending is not None:
            futures.wait([self._pending[1]], timeout=timeout_s)
            self._pending = None
        self._free()

    def _free(self) -> None:
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        if self._stager is not None:
            self._stager.close()
            self._background_stager.close()
            self._pool.shutdown(wait=False)
            self._stager = None


def _stepped_keys(model_state: dict, optimizer) -> set[str]:
    """Keys of the model's state dict whose tensors are parameters ``optimizer`` steps."""
    def storage(t) -> int:
        return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage().data_ptr()

    stepped = {storage(p) for group in optimizer.param_groups for p in group["params"]} - {0}
    return {k for k, v in model_state.items() if isinstance(v, torch.Tensor) and storage(v) in stepped}
