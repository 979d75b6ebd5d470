"""The context's checkpoint glue: restore at ``prepare``, save at step boundaries, wait, free.

:class:`Checkpointing` is owned by the training loop's thread. It wires the job's
:class:`~shipyard.checkpoint.saver.Checkpointer` (which does the saving, in the background by
default) to the model, optimizer, scheduler and data stream the context holds, and remembers
the step last saved. Several prepared parts (``ctx.prepare(..., name=...)``) are saved in one
checkpoint; each is restored when it is added, the data position and ``ctx.state`` with the
first. Rank 0's upload thread enters it only through :meth:`_committed`, which posts the commit
to the publisher and touches nothing else here.
"""

from __future__ import annotations

import torch.distributed as dist

from shipyard.checkpoint import CheckpointStore, CommitRecord
from shipyard.checkpoint import dcp as ckpt
from shipyard.checkpoint.saver import Checkpointer, Saved
from shipyard.data import ShardStream
from shipyard.runtime import user_state
from shipyard.runtime.publisher import Publisher
from shipyard.spec import JobSpec


class Checkpointing:
    """One job's checkpoints as one rank's loop sees them (inert when the spec has no checkpoint)."""

    def __init__(self, spec: JobSpec, stream: ShardStream, publisher: Publisher):
        self.spec, self._stream, self._publisher = spec, stream, publisher
        self.store = CheckpointStore(spec.checkpoint.uri, spec.checkpoint.line) if spec.checkpoint else None
        self.saved_step: int | None = None  # the step of the last checkpoint saved or restored
        self.busy = False  # inside a restore, a save or a wait for a commit: not a stall (watchdog.py)
        self._checkpointer: Checkpointer | None = None
        self._parts: list[ckpt.Part] = []
        self._record: CommitRecord | None = None  # what the first part was restored from
        self._rng: dict | None = None  # the restored RNG state, until the loop starts

    @property
    def enabled(self) -> bool:
        """The spec has a checkpoint section."""
        return self.store is not None

    @property
    def started(self) -> bool:
        """Enabled, and a part was added (``ctx.prepare``): saves are possible."""
        return self._checkpointer is not None

    def add(self, part: ckpt.Part) -> tuple[CommitRecord, dict] | None:
        """A part was prepared: restore it from the latest committed checkpoint (collective).

        The first part also builds the Checkpointer (collective) and restores the data stream,
        and returns what was restored with ``ctx.state``'s saved values, if anything was; later
        parts return None. The RNG state waits for :meth:`restore_rng`."""
        self._parts.append(part)
        if self.store is None:
            return None
        first = self._checkpointer is None
        if first:
            ck = self.spec.checkpoint
            self._checkpointer = Checkpointer(self.store, strategy=self.spec.strategy.kind, keep_last=ck.keep_last,
                                              async_upload=ck.async_upload, on_commit=self._committed)
        self.busy = True
        try:
            if first:
                self._record = self.store.latest()
            record = self._record
            if record is None:
                return None
            ckpt.load_part(record, part)
            if not first:
                return None
            # Every rank's data state, so that a different world size still resumes exactly.
            self._stream.load_state_dict(_data_states(record.data))
            rank_state = ckpt.read_rank_state(self.store, record)
            self._rng = rank_state["rng"] if rank_state is not None else None
            values, empty = user_state.from_record(record.state, record.uri)
            state = {**values, **ckpt.load_tensors(record, empty)}
            self.saved_step = record.step
            return record, state
        finally:
            self.busy = False

    def restore_rng(self) -> None:
        """Set the restored RNG state (once), as the loop starts: where the saving run captured it."""
        if self._rng is not None:
            ckpt.set_rng_state(self._rng)
            self._rng = None

    def save(self, step: int, state: dict, finished: dict | None = None) -> None:
        """Checkpoint at ``step`` (collective); returns once the state is staged (see saver.py).
        ``state``: ``ctx.state``, checked here (a UserError names a key that cannot be saved)."""
        values = user_state.split(state)
        record = {"parts": [p.name for p in self._parts], "state": values.record(), "finished": finished}
        self.busy = True  # the save waits for the previous upload's commit
        try:
            self._checkpointer.save(step=step, epoch=self._stream.epoch, parts=self._parts, tensors=values.tensors,
                                    data_state=self._stream.state_dict(), record=record)
        finally:
            self.busy = False
        self.saved_step = step

    def stop(self, step: int, state: dict, finished: dict) -> None:
        """The run stops at ``step`` (collective): a checkpoint there marked ``finished``. When
        one was saved at this very step already, its commit record is marked instead."""
        if self.saved_step != step:
            self.save(step, state, finished)
            return
        self.wait()
        if dist.get_rank() == 0:
            record = self.store.read_record(step)
            if record is not None:  # None: the step was restored from an older line's record
                self.store.mark_finished(record, finished)
        dist.barrier()

    def wait(self) -> None:
        """Block until the checkpoint in flight, if any, is committed; re-raise its failure."""
        if self._checkpointer is not None:
            self.busy = True
            try:
                self._checkpointer.wait()
            finally:
                self.busy = False

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()

    def abandon(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.abandon()

    def _committed(self, saved: Saved) -> None:
        # Rank 0's upload thread (the loop's own with async_upload off), once COMMIT.json is written.
        r = saved.record
        self._publisher.post(
            f"checkpoint at step {r.step} committed ({r.bytes / 1e6:.1f} MB; training blocked "
            f"{saved.blocked_s:.2f}s, committed after {saved.total_s:.2f}s): {r.uri}",
            step=r.step, numbers={"checkpoint_blocked_s": saved.blocked_s}, checkpoint=r.uri, committed_step=r.step)


def _data_states(states: list[dict]) -> list[dict]:
    """One state per data-parallel rank: tensor/pipeline peers saved the same position."""
    seen, out = set(), []
    for s in states:
        key = (s.get("world"), s.get("rank"))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
