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
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shipyard import storage
from shipyard.data.manifest import Manifest, decode_shard, read_manifest
from shipyard.errors import DataError

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


def to_torch(table: pa.Table) -> dict:
    """Default collate: one tensor per column; fixed-size lists become 2-D tensors."""
    import torch

    out = {}
    for name, col in zip(table.column_names, table.columns):
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        # One copy (writable=True): tensors the user may modify in place must not alias the
        # shard's buffers.
        if pa.types.is_fixed_size_list(arr.type):
            values = arr.flatten().to_numpy(zero_copy_only=False, writable=True)
            out[name] = torch.from_numpy(values.reshape(len(arr), arr.type.list_size))
        elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
            out[name] = torch.from_numpy(arr.to_numpy(zero_copy_only=False, writable=True))
        else:
            out[name] = arr.to_pylist()
    return out


class ShardStream:
    """Iterates this rank's batches from the current position through the last epoch."""

    def __init__(self, dataset: str | Manifest, *, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, epochs: int = 1, drop_remainder: bool = True,
                 collate: Callable[[pa.Table], object] = to_torch, prefetch: int = 2):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.manifest = dataset if isinstance(dataset, Manifest) else read_manifest(dataset)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.drop_remainder, self.collate, self.prefetch = drop_remainder, collate, max(1, prefetch)
        self.epoch = 0
        self.consumed = 0  # rows of this rank's share handed out in the current epoch
        self._rows = [s.rows for s in self.manifest.shards]
        self._owned: list[Interval] | None = None  # None: the fresh layout of the epoch
        self._steps = 0

    # -- position -------------------------------------------------------------------------
    def _fresh(self, rank: int, world: int) -> tuple[list[Interval], int]:
        start, stop = rank_range(self.manifest.rows, rank, world, self.drop_remainder)
        return [(start, stop)], -(-(stop - start) // self.batch_size)

    def _layout(self) -> tuple[list[Interval], int]:
        """This epoch's (owned intervals, steps)."""
        if self._owned is not None:
            return self._owned, self._steps
        return self._fresh(self.rank, self.world)

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
    def _read(self, seg: Segment, epoch: int) -> pa.Table:
        uri = self.manifest.shard_uri(seg.shard)
        fs, path = storage.filesystem(uri)
        try:
            table = decode_shard(fs.cat_file(path), self.manifest.format)
        except FileNotFoundError:
            raise DataError(f"{uri}: shard listed in the manifest is missing") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{uri}: shard is corrupt or unreadable: {e}") from None
        if not table.schema.equals(self.manifest.schema):
            raise DataError(f"{uri}: shard schema differs from the manifest's:\n  {table.schema}\n  vs\n  {self.manifest.schema}")
        if table.num_rows != self._rows[seg.shard]:
            raise DataError(f"{uri}: shard has {table.num_rows} rows, manifest says {self._rows[seg.shard]}")
        order = row_order(table.num_rows, self.seed, epoch, seg.shard, self.shuffle)
        if order is None:
            return table.slice(seg.lo, seg.hi - seg.lo)
        return table.take(pa.array(order[seg.lo:seg.hi]))

    def _plan(self) -> Iterator[tuple[int, Segment]]:
        """(epoch, segment) for everything left to read, across epoch boundaries."""
        first = self.epoch
        for epoch in range(first, self.epochs):
            order = shard_order(len(self._rows), self.seed, epoch, self.shuffle)
            if epoch == first:
                owned = take_after(self._layout()[0], self.consumed)
            else:
                owned = self._fresh(self.rank, self.world)[0]
            for lo, hi in owned:
                for seg in segments(self._rows, order, lo, hi):
                    yield epoch, seg

    def _tables(self) -> Iterator[tuple[int, pa.Table]]:
        """Read the plan ``prefetch`` segments ahead, in threads. One pipeline spans all epochs,
        so the first shard of the next epoch is already in memory when the current one ends."""
        pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="shipyard-prefetch")
        pending: deque[tuple[int, Future]] = deque()
        try:
            for epoch, seg in self._plan():
                pending.append((epoch, pool.submit(self._read, seg, epoch)))
                if len(pending) > self.prefetch:
                    epoch, fut = pending.popleft()
                    yield epoch, fut.result()
            while pending:
                epoch, fut = pending.popleft()
                yield epoch, fut.result()
        finally:
            for _, f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _next_size(self) -> int:
        """Rows in the next batch: ``batch_size``, except the epoch's last batch takes the rest."""
        owned, steps = self._layout()
        length = sum(hi - lo for lo, hi in owned)
        if self.consumed // self.batch_size < steps - 1:
            return self.batch_size
        return length - self.consumed

    def __iter__(self) -> Iterator[object]:
        buf: list[pa.Table] = []
        have = 0
        for epoch, table in self._tables():
            if epoch != self.epoch:  # the previous epoch is done: its last batch, then move on
                if have:
                    self.consumed += have
                    yield self.collate(pa.concat_tables(buf))
                    buf, have = [], 0
                self.epoch, self.consumed, self._owned = epoch, 0, None
            buf.append(table)
            have += table.num_rows
            while have and have >= (size := self._next_size()):
                joined = pa.concat_tables(buf) if len(buf) > 1 else buf[0]
                batch, rest = joined.slice(0, size), joined.slice(size)
                buf, have = [rest], rest.num_rows
                self.consumed += batch.num_rows
                yield self.collate(batch)
        if have:
            self.consumed += have
            yield self.collate(pa.concat_tables(buf))
        self.epoch, self.consumed, self._owned = self.epochs, 0, None
