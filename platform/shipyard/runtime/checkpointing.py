"""The context's checkpoint glue: restore at ``prepare``, save at step boundaries, wait, free.

:class:`Checkpointing` is owned by the training loop's thread. It wires the job's
:class:`~shipyard.checkpoint.saver.Checkpointer` (which does the saving, in the background by
default) to the model, optimizer, scheduler and data stream the context holds, and remembers
the step last saved. Rank 0's upload thread enters it only through :meth:`_committed`, which
posts the commit to the publisher and touches nothing else here.
"""

from __future__ import annotations

from shipyard.checkpoint import CheckpointStore, CommitRecord
from shipyard.checkpoint import dcp as ckpt
from shipyard.checkpoint.saver import Checkpointer, Saved
from shipyard.data import ShardStream
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
        self._model = self._optimizer = self._scheduler = None

    @property
    def enabled(self) -> bool:
        """The spec has a checkpoint section."""
        return self.store is not None

    @property
    def started(self) -> bool:
        """Enabled, and :meth:`start` ran (``ctx.prepare``): saves are possible."""
        return self._checkpointer is not None

    def start(self, model, optimizer, scheduler) -> CommitRecord | None:
        """Build the Checkpointer (collective) and restore the latest committed checkpoint into
        the model, optimizer, scheduler, data stream and RNG. Returns what was restored, if any."""
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        if self.store is None:
            return None
        ck = self.spec.checkpoint
        self._checkpointer = Checkpointer(self.store, strategy=self.spec.strategy.kind, keep_last=ck.keep_last,
                                          async_upload=ck.async_upload, on_commit=self._committed)
        self.busy = True
        try:
            record = self.store.latest()
            if record is None:
                return None
            rank_state = ckpt.restore(self.store, record, model=model, optimizer=optimizer, scheduler=scheduler)
            # Every rank's data state, so that a different world size still resumes exactly.
            self._stream.load_state_dict(_data_states(record.data))
            if rank_state is not None:
                ckpt.set_rng_state(rank_state["rng"])
            self.saved_step = record.step
            return record
        finally:
            self.busy = False

    def save(self, step: int) -> None:
        """Checkpoint at ``step`` (collective); returns once the state is staged (see saver.py)."""
        self.busy = True  # the save waits for the previous upload's commit
        try:
            self._checkpointer.save(step=step, epoch=self._stream.epoch, model=self._model,
                                    optimizer=self._optimizer, scheduler=self._scheduler,
                                    data_state=self._stream.state_dict())
        finally:
            self.busy = False
        self.saved_step = step

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
