"""One rank's stream of batches over a sharded dataset, resumable from a small state dict.

The order of an epoch is a pure function of ``(seed, epoch)``: shards are permuted, then the
rows inside each shard. That global sequence is cut into ``world`` contiguous, equal ranges
(the last ``rows % world`` rows are dropped so every rank takes the same number of steps, which
DDP's lock-step collectives need); rank ``r`` reads range ``r``, so it touches only about
``1/world`` of the shards. Eval streams (``drop_remainder=False``) keep every row instead and
ranks may differ by one row.

Resumption is a computation, not a replay. A rank's state is a small dict: ``owned`` (the
intervals of epoch positions this rank reads, in order), ``consumed`` (rows of them handed out),
``steps`` (batches every rank takes this epoch), plus ``seed``, ``epoch``, ``world``, ``rank``.
Resuming at the same world size seeks straight to row ``consumed``. Resuming at a different
world size takes every rank's state (the checkpoint stores them all), computes the positions not
yet consumed, and splits them into ``world`` contiguous near-equal parts (:func:`repartition`):
the epoch still sees every row exactly once. In that resumed epoch ranks may hold one row more
than others; the extra row goes into the last batch so every rank takes the same number of
steps. If fewer rows remain than ranks, those few rows are dropped (they cannot be split evenly).

Reading runs ahead of the caller in two stages: ``prefetch`` shards are read in threads, and
``ready_batches`` batches are assembled from them in one background thread
(:mod:`shipyard.data.prefetch`), each paired with the position just after it. The stream's
position changes only when the caller takes a batch, so :meth:`ShardStream.state_dict` always
describes the last batch handed out, never one merely prepared. Batches are gathered straight
from the shards' Arrow buffers (:mod:`shipyard.data.gather`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shipyard.data.columns import Columns, float64_columns, note_float64
from shipyard.data.gather import Piece, Rows, batch_table, fixed_width, gather_batch, read_bytes, to_torch
from shipyard.data.manifest import Manifest, decode_shard, read_manifest
from shipyard.data.prefetch import Ahead, wait
from shipyard.errors import DataError

__all__ = ["ShardStream", "to_torch"]  # to_torch: still importable from here

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """Rows ``[lo, hi)`` of shard ``shard`` in that shard's epoch row order."""

    shard: int
    lo: int
    hi: int


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed, epoch]).permutation(n_shards)


def row_order(rows: int, seed: int, epoch: int, shard: int, shuffle: bool) -> np.ndarray | None:
    """The epoch's order of rows inside one shard (None: file order)."""
    if not shuffle:
        return None
    return np.random.default_rng([seed, epoch, shard]).permutation(rows)


def rank_range(total: int, rank: int, world: int, drop_remainder: bool) -> tuple[int, int]:
    """Rank's ``[start, stop)`` in the epoch's global row sequence."""
    if drop_remainder:
        per = total // world
        return rank * per, (rank + 1) * per
    bounds = np.linspace(0, total, world + 1).astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def segments(rows_per_shard: list[int], order: np.ndarray, start: int, stop: int) -> list[Segment]:
    """Cut global positions ``[start, stop)`` of the shard sequence ``order`` into per-shard pieces."""
    out, pos = [], 0
    for s in order:
        n = rows_per_shard[s]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append(Segment(int(s), lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


Interval = tuple[int, int]


def take_after(intervals: list[Interval], k: int) -> list[Interval]:
    """``intervals`` without their first ``k`` positions."""
    out = []
    for lo, hi in intervals:
        if k >= hi - lo:
            k -= hi - lo
            continue
        out.append((lo + k, hi))
        k = 0
    return out


def repartition(states: list[dict], world: int, batch_size: int) -> tuple[list[list[Interval]], int]:
    """Split what every rank has not consumed yet into ``world`` parts; returns (parts, steps)."""
    remaining = sorted(iv for st in states for iv in take_after([tuple(i) for i in st["owned"]], st["consumed"]))
    q, extra = divmod(sum(hi - lo for lo, hi in remaining), world)
    if q == 0:
        return [[] for _ in range(world)], 0
    parts, rest = [], remaining
    for r in range(world):
        size = q + (r < extra)
        part, taken = [], 0
        while taken < size:
            lo, hi = rest[0]
            n = min(hi - lo, size - taken)
            part.append((lo, lo + n))
            taken += n
            rest = [(lo + n, hi)] + rest[1:] if lo + n < hi else rest[1:]
        parts.append(part)
    return parts, -(-q // batch_size)


@dataclass(frozen=True)
class Position:
    """Where a rank is: ``consumed`` rows of epoch ``epoch``'s ``owned`` intervals (None: the
    epoch's fresh layout), which take ``steps`` batches."""

    epoch: int
    consumed: int
    owned: list[Interval] | None
    steps: int


class ShardStream:
    """Iterates this rank's batches from the current position through the last epoch.

    ``prefetch`` shards are read ahead (in threads) and ``ready_batches`` batches assembled
    ahead (in one background thread; 0: in the caller's thread, when it asks). Whatever runs
    ahead, :meth:`state_dict` is the position after the last batch handed to the caller.
    With the default ``collate`` a batch is a dict of tensors (see :mod:`shipyard.data.gather`),
    fresh ones except with ``shuffle=False``, where a batch inside one shard is a view of it
    (keeping such a batch keeps its shard's column in memory: clone what you keep).
    ``pin_memory``: None pins batches when CUDA is in use in this process when iteration starts
    (on its current device), True requires CUDA, False never pins.
    """

    def __init__(self, dataset: str | Manifest, *, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, epochs: int = 1, drop_remainder: bool = True,
                 collate: Callable[[pa.Table], object] = to_torch, prefetch: int = 2, ready_batches: int = 4,
                 pin_memory: bool | None = None, columns: dict | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if ready_batches < 0:
            raise ValueError(f"ready_batches must be >= 0, got {ready_batches}")
        if pin_memory and not _cuda_available():
            raise ValueError("pin_memory=True needs CUDA, and torch.cuda.is_available() is False")
        self.manifest = dataset if isinstance(dataset, Manifest) else read_manifest(dataset)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.drop_remainder, self.collate, self.prefetch = drop_remainder, collate, max(1, prefetch)
        self.ready_batches, self.pin_memory = ready_batches, pin_memory
        self.epoch = 0
        self.consumed = 0  # rows of this rank's share handed out in the current epoch
        self._rows = [s.rows for s in self.manifest.shards]
        # columns (dataset.columns): read only these, cast and rename them; checked here, before training
        self.columns = Columns(columns, self.manifest.schema) if columns else None
        self._names = self.columns.names if self.columns else self.manifest.schema.names
        if rank == 0:  # one line per run, not one per rank
            note_float64(str(getattr(dataset, "uri", dataset)), float64_columns(self.manifest.schema, self.columns))
        self._owned: list[Interval] | None = None  # None: the fresh layout of the epoch
        self._steps = 0
        self._ahead: Ahead | None = None

    # -- position -------------------------------------------------------------------------
    def _fresh(self, rank: int, world: int) -> tuple[list[Interval], int]:
        start, stop = rank_range(self.manifest.rows, rank, world, self.drop_remainder)
        return [(start, stop)], -(-(stop - start) // self.batch_size)

    def _layout(self, pos: Position | None = None) -> tuple[list[Interval], int]:
        """The (owned intervals, steps) of ``pos``'s epoch (default: the current position)."""
        owned, steps = (self._owned, self._steps) if pos is None else (pos.owned, pos.steps)
        if owned is not None:
            return owned, steps
        return self._fresh(self.rank, self.world)

    def _next_size(self, pos: Position) -> int:
        """Rows in the batch after ``pos``: ``batch_size``, except the epoch's last takes the rest."""
        owned, steps = self._layout(pos)
        if pos.consumed // self.batch_size < steps - 1:
            return self.batch_size
        return sum(hi - lo for lo, hi in owned) - pos.consumed

    @property
    def batches_per_epoch(self) -> int:
        return self._fresh(self.rank, self.world)[1]

    @property
    def total_batches(self) -> int:
        return self.batches_per_epoch * self.epochs

    @property
    def remaining_batches(self) -> int:
        if self.epoch >= self.epochs:
            return 0
        steps = self._layout()[1]
        left = max(0, steps - -(-self.consumed // self.batch_size))
        return left + (self.epochs - self.epoch - 1) * self.batches_per_epoch

    def state_dict(self) -> dict:
        owned, steps = self._layout()
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "world": self.world,
                "rank": self.rank, "owned": [list(iv) for iv in owned], "steps": steps}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restore from this rank's state, or from every rank's (needed when the world size changed)."""
        states = [self._complete(s) for s in (state if isinstance(state, list) else [state])]
        if states[0]["seed"] != self.seed:
            log.warning("data stream: checkpoint used shuffle seed %s, spec says %s; continuing with %s",
                        states[0]["seed"], self.seed, self.seed)
        self.epoch = int(states[0]["epoch"])
        mine = [s for s in states if s["world"] == self.world and s["rank"] == self.rank]
        if mine:
            s = mine[0]
            self._owned, self._steps, self.consumed = [tuple(i) for i in s["owned"]], int(s["steps"]), int(s["consumed"])
            return
        if len(states) != states[0]["world"]:
            raise ValueError(f"resuming {states[0]['world']} ranks' data position on {self.world} ranks "
                             f"needs all {states[0]['world']} rank states, got {len(states)}")
        parts, self._steps = repartition(states, self.world, self.batch_size)
        self._owned, self.consumed = parts[self.rank], 0

    def _complete(self, state: dict) -> dict:
        """States written before ``owned`` existed describe the fresh layout."""
        if "owned" in state:
            return state
        owned, steps = self._fresh(state["rank"], state["world"])
        return {**state, "owned": [list(iv) for iv in owned], "steps": steps}

    # -- reading --------------------------------------------------------------------------
    def _read(self, seg: Segment, epoch: int) -> Rows:
        uri = self.manifest.shard_uri(seg.shard)
        try:
            data, ours = read_bytes(uri)
            table = decode_shard(data, self.manifest.format)
        except FileNotFoundError:
            raise DataError(f"{uri}: shard listed in the manifest is missing") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{uri}: shard is corrupt or unreadable: {e}") from None
        if not table.schema.equals(self.manifest.schema):
            raise DataError(f"{uri}: shard schema differs from the manifest's:\n  {table.schema}\n  vs\n  {self.manifest.schema}")
        if table.num_rows != self._rows[seg.shard]:
            raise DataError(f"{uri}: shard has {table.num_rows} rows, manifest says {self._rows[seg.shard]}")
        if self.columns:
            table = table.select(self._names)  # projection: the other columns are never gathered
        columns = fixed_width(table, ours) if self.collate is to_torch else {}
        order = row_order(table.num_rows, self.seed, epoch, seg.shard, self.shuffle)
        return Rows(table, order, seg.lo, seg.hi - seg.lo, columns)

    def _plan(self, start: Position) -> Iterator[tuple[int, Segment]]:
        """(epoch, segment) for everything left to read from ``start``, across epoch boundaries."""
        for epoch in range(start.epoch, self.epochs):
            order = shard_order(len(self._rows), self.seed, epoch, self.shuffle)
            if epoch == start.epoch:
                owned = take_after(self._layout(start)[0], start.consumed)
            else:
                owned = self._fresh(self.rank, self.world)[0]
            for lo, hi in owned:
                for seg in segments(self._rows, order, lo, hi):
                    yield epoch, seg

    def _segments(self, start: Position, stop: threading.Event) -> Iterator[tuple[int, Rows]]:
        """Read the plan ``prefetch`` segments ahead, in threads. One pipeline spans all epochs,
        so the first shard of the next epoch is already in memory when the current one ends.
        Waits end when ``stop`` is set (see :mod:`shipyard.data.prefetch`)."""
        pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="shipyard-prefetch")
        pending: deque[tuple[int, Future]] = deque()
        try:
            for epoch, seg in self._plan(start):
                pending.append((epoch, pool.submit(self._read, seg, epoch)))
                if len(pending) > self.prefetch:
                    epoch, fut = pending.popleft()
                    yield epoch, wait(fut, stop)
            while pending:
                epoch, fut = pending.popleft()
                yield epoch, wait(fut, stop)
        finally:
            for _, f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _assemble(self, start: Position, device: int | None,
                  stop: threading.Event) -> Iterator[tuple[object, Position]]:
        """Every batch from ``start`` on, each with the position just after it.

        This runs ahead of the consumer (in :class:`Ahead`'s thread), so it keeps its own
        position; the stream's fields change only when the consumer takes a batch. A batch is
        ``batch_size`` rows, except the epoch's last, which takes what the epoch has left (with a
        repartitioned layout that may be one row more)."""
        if device is not None:
            import torch

            torch.cuda.set_device(device)  # pinned memory on the training device, not GPU 0
        epoch, consumed, owned, steps = start.epoch, start.consumed, start.owned, start.steps
        pending: deque[Piece] = deque()
        have = 0

        def cut(n: int) -> list[Piece]:
            pieces = []
            while n:
                seg, a, b = pending[0]
                k = min(n, b - a)
                pieces.append((seg, a, a + k))
                if a + k == b:
                    pending.popleft()
                else:
                    pending[0] = (seg, a + k, b)
                n -= k
            return pieces

        def batch(n: int) -> tuple[object, Position]:
            nonlocal have, consumed
            pieces = cut(n)
            have -= n
            consumed += n
            if self.collate is to_torch:
                made = gather_batch(pieces, self._names, pin=device is not None)
                if self.columns:
                    made = self.columns.apply(made)
            else:
                made = self.collate(batch_table(pieces))
            return made, Position(epoch, consumed, owned, steps)

        for seg_epoch, rows in self._segments(start, stop):
            if seg_epoch != epoch:  # the previous epoch is done: its last batch, then move on
                if have:
                    yield batch(have)
                epoch, consumed, owned = seg_epoch, 0, None
            pending.append((rows, 0, rows.count))
            have += rows.count
            while have and have >= (size := self._next_size(Position(epoch, consumed, owned, steps))):
                yield batch(size)
        if have:
            yield batch(have)

    def _device(self) -> int | None:
        """The CUDA device to pin batches for, or None (see ``pin_memory``)."""
        if self.pin_memory is False or not _cuda_available():
            return None
        import torch

        if self.pin_memory is None and not torch.cuda.is_initialized():
            return None
        return torch.cuda.current_device()

    @property
    def prefetched(self) -> int:
        """Batches assembled ahead of the consumer and waiting (0 without ``ready_batches``)."""
        return self._ahead.ready if self._ahead is not None else 0

    def __iter__(self) -> Iterator[object]:
        start = Position(self.epoch, self.consumed, self._owned, self._steps)
        device = self._device()
        if self.ready_batches:
            ahead = Ahead(lambda stop: self._assemble(start, device, stop), self.ready_batches, "shipyard-batches")
            items: Iterator = iter(ahead)
        else:
            ahead, items = None, self._assemble(start, device, threading.Event())
        self._ahead = ahead
        try:
            for batch, pos in items:
                self.epoch, self.consumed, self._owned, self._steps = pos.epoch, pos.consumed, pos.owned, pos.steps
                yield batch
            self.epoch, self.consumed, self._owned = self.epochs, 0, None
        finally:
            if ahead is not None:
                ahead.close()
                if self._ahead is ahead:
                    self._ahead = None
            else:
                items.close()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
