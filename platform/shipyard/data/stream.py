"""One rank's stream of batches over a sharded dataset, resumable from a small state dict.

The order of an epoch is a pure function of ``(seed, epoch)``: shards are permuted, then the
rows inside each shard. That global sequence is cut into ``world`` contiguous, equal ranges
(the last ``rows % world`` rows are dropped so every rank takes the same number of steps, which
DDP's lock-step collectives need); rank ``r`` reads range ``r``, so it touches only about
``1/world`` of the shards. Eval streams (``drop_remainder=False``) keep every row instead and
ranks may differ by one row.

Resumption is a computation, not a replay: :meth:`ShardStream.state_dict` is
``{seed, epoch, consumed, world, rank}``, and :meth:`load_state_dict` seeks straight to
row ``consumed`` of the rank's range.
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
from shipyard.data.manifest import Manifest, read_manifest
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
        self.consumed = 0  # rows of this rank's range handed out in the current epoch
        self._rows = [s.rows for s in self.manifest.shards]

    # -- position -------------------------------------------------------------------------
    @property
    def rows_per_epoch(self) -> int:
        start, stop = rank_range(self.manifest.rows, self.rank, self.world, self.drop_remainder)
        return stop - start

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.rows_per_epoch // self.batch_size)

    @property
    def total_batches(self) -> int:
        return self.batches_per_epoch * self.epochs

    @property
    def batches_done(self) -> int:
        return self.epoch * self.batches_per_epoch + -(-self.consumed // self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed,
                "world": self.world, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            log.warning("data stream: checkpoint used shuffle seed %s, spec says %s; continuing with %s",
                        state["seed"], self.seed, self.seed)
        self.epoch = int(state["epoch"])
        if state["world"] == self.world:
            self.consumed = min(int(state["consumed"]), self.rows_per_epoch)
        else:
            log.warning("data stream: checkpoint was taken with %s workers, now %s; restarting epoch %s "
                        "from its first row", state["world"], self.world, self.epoch)
            self.consumed = 0

    # -- reading --------------------------------------------------------------------------
    def _read(self, seg: Segment, epoch: int) -> pa.Table:
        uri = self.manifest.shard_uri(seg.shard)
        fs, path = storage.filesystem(uri)
        try:
            buf = fs.cat_file(path)
            table = pa.ipc.open_file(pa.py_buffer(buf)).read_all()
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
        start, stop = rank_range(self.manifest.rows, self.rank, self.world, self.drop_remainder)
        first, skip = self.epoch, self.consumed
        for epoch in range(first, self.epochs):
            order = shard_order(len(self._rows), self.seed, epoch, self.shuffle)
            for seg in segments(self._rows, order, start + (skip if epoch == first else 0), stop):
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

    def __iter__(self) -> Iterator[object]:
        buf: list[pa.Table] = []
        have = 0
        for epoch, table in self._tables():
            if epoch != self.epoch:  # the previous epoch is done: its short last batch, then move on
                if have:
                    self.consumed += have
                    yield self.collate(pa.concat_tables(buf))
                    buf, have = [], 0
                self.epoch, self.consumed = epoch, 0
            buf.append(table)
            have += table.num_rows
            while have >= self.batch_size:
                joined = pa.concat_tables(buf) if len(buf) > 1 else buf[0]
                batch, rest = joined.slice(0, self.batch_size), joined.slice(self.batch_size)
                buf, have = [rest], rest.num_rows
                self.consumed += batch.num_rows
                yield self.collate(batch)
        if have:
            self.consumed += have
            yield self.collate(pa.concat_tables(buf))
        self.epoch, self.consumed = self.epochs, 0
