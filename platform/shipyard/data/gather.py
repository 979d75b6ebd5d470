"""One segment's rows, decoded once; batches gathered from them in one pass.

A shard is read into memory whole (into an Arrow buffer of our own from local disk, s3fs's
``bytes`` from S3) and decoded without copying: each fixed-width column (integers, floats, fixed-size lists of
them, no nulls) becomes one tensor over the shard's Arrow buffer, ``(rows,)`` or
``(rows, list_size)``. A batch is then built by gathering its rows, in the epoch's shuffled
order, straight into a fresh tensor per column (``np.take(..., out=)``): one copy,
no intermediate Arrow table and no second copy to make the result writable. Unshuffled batches
that lie inside one shard are handed out as views of the shard, no copy at all, where the
shard's memory is ours (a local read, or a column that had to be combined); an S3 read's
``bytes`` are immutable, so those batches are one contiguous copy.

Why a fresh tensor per batch rather than a ring of reused ones: a user may keep a batch (an
eval loop collecting labels), and a recycled buffer would change under it. The allocators make
the fresh allocation cheap: NumPy's hands freed blocks back (no page faults in steady state), and
torch's pinned-memory cache does the same for pinned batches.

Other columns (booleans, nullable columns, strings, nested lists) go through Arrow's ``take``
and :func:`column_to_torch`, exactly as the table collate does, so every batch has the same
keys, dtypes and shapes :func:`to_torch` gives for the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from shipyard import storage

# torch is imported where used, not here: `shipyard data shard` imports this package and
# never needs it.


def column_to_torch(arr: pa.Array) -> object:
    """One column of a batch: a tensor (fixed-size lists become 2-D), else a Python list."""
    import torch

    # One copy (writable=True): tensors the user may modify in place must not alias the
    # shard's buffers.
    if pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False, writable=True)
        return torch.from_numpy(values.reshape(len(arr), arr.type.list_size))
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        return torch.from_numpy(arr.to_numpy(zero_copy_only=False, writable=True))
    return arr.to_pylist()


def to_torch(table: pa.Table) -> dict:
    """Default collate: one tensor per column; fixed-size lists become 2-D tensors.

    The stream does not call this for its default batches (it gathers them directly, with the
    same result); it is the reference for what they hold, and a collate to build on."""
    out = {}
    for name, col in zip(table.column_names, table.columns):
        out[name] = column_to_torch(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())
    return out


def read_bytes(uri: str) -> tuple[pa.Buffer, bool]:
    """A shard's bytes, and whether that memory is ours to hand out (writable, unshared).

    A local file is read into a buffer from Arrow's memory pool, as ``pa.OSFile.read`` does (the
    pool keeps freed pages, so a shard's buffer reuses the last one's); S3 gives s3fs's ``bytes``,
    which are immutable."""
    fs, path = storage.filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        return pa.py_buffer(fs.cat_file(path)), False
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = pa.allocate_buffer(size)
        view, got = memoryview(buf), 0
        while got < size and (n := f.readinto(view[got:])):
            got += n
    if got < size:  # the file shrank while we read it
        raise OSError(f"read {got} of {size} bytes")
    return buf, True


@dataclass(frozen=True)
class Column:
    """A fixed-width column of a shard over its Arrow memory: as a tensor (``(rows,)`` or
    ``(rows, list_size)``), the same memory as a NumPy array, and whether the memory is ours
    (a view of it may be handed to the user, who may write to it)."""

    tensor: torch.Tensor
    array: np.ndarray
    ours: bool


def _column(col: pa.ChunkedArray, ours: bool) -> Column | None:
    """The column as a :class:`Column` (None: not fixed-width, or has nulls)."""
    import torch

    t = col.type
    fsl = pa.types.is_fixed_size_list(t)
    inner = t.value_type if fsl else t
    if not (pa.types.is_integer(inner) or pa.types.is_floating(inner)) or (fsl and t.list_size == 0):
        return None
    if col.num_chunks != 1:  # shards written before one record batch per shard (writer.py)
        arr, ours = col.combine_chunks(), True
    else:
        arr = col.chunk(0)
    if arr.null_count:
        return None
    if fsl:
        values = arr.flatten()
        if values.null_count:
            return None
        tensor = torch.from_dlpack(values).view(len(arr), t.list_size)
    else:
        tensor = torch.from_dlpack(arr)
    return Column(tensor, tensor.numpy(), ours)


@dataclass
class Rows:
    """One segment: rows ``lo .. lo + count`` of a shard in its epoch order.

    ``index`` maps those positions to the shard's rows (None: file order); ``columns`` has a
    :class:`Column` per fixed-width column (None for the others)."""

    table: pa.Table
    index: np.ndarray | None
    lo: int
    count: int
    columns: dict[str, Column | None]

    def rows(self, a: int, b: int) -> pa.Table:
        """Positions ``a .. b`` of the segment as an Arrow table (the slow path)."""
        if self.index is None:
            return self.table.slice(self.lo + a, b - a)
        return self.table.take(pa.array(self.index[self.lo + a:self.lo + b]))


def fixed_width(table: pa.Table, ours: bool) -> dict[str, Column | None]:
    """The table's columns as :class:`Column` where they are fixed-width, else None."""
    return {name: _column(col, ours) for name, col in zip(table.column_names, table.columns)}


Piece = tuple[Rows, int, int]  # positions [a, b) of one segment


def gather_batch(pieces: list[Piece], names: list[str], pin: bool) -> dict:
    """The batch made of ``pieces`` (in order), as :func:`to_torch` would give it.

    The copies are NumPy's (``take``, ``copyto``): single-threaded, and they release the GIL.
    Torch's ``index_select`` is faster on an idle machine but splits large copies over its
    OpenMP pool, and an OpenMP region entered from a background thread while the training
    thread and other processes hold the cores stalls for milliseconds (measured: 6 ms for a
    256-row batch on 2 busy cores, against 0.1 ms in one thread)."""
    import torch

    n = sum(b - a for _, a, b in pieces)
    out, copies = {}, []
    for name in names:
        if any(seg.columns.get(name) is None for seg, _, _ in pieces):
            arrs = [seg.rows(a, b).column(name) for seg, a, b in pieces]
            out[name] = column_to_torch(pa.chunked_array([c for a in arrs for c in a.chunks], arrs[0].type).combine_chunks())
            continue
        seg, a, b = pieces[0]
        col = seg.columns[name]
        if len(pieces) == 1 and seg.index is None and col.ours:
            out[name] = col.tensor[seg.lo + a:seg.lo + b]  # zero-copy: each row is handed out once
            continue
        shape = (n, *col.array.shape[1:])
        if pin:
            out[name] = torch.empty(shape, dtype=col.tensor.dtype, pin_memory=True)
            dst = out[name].numpy()
        else:  # NumPy's allocator: in a stream of batches its freed blocks come back warm in cache
            dst = np.empty(shape, col.array.dtype)  # (a gather into it measured faster than into torch.empty's)
            out[name] = torch.from_numpy(dst)
        copies.append((name, dst))
    r = 0
    for seg, a, b in pieces:
        lo, hi = seg.lo + a, seg.lo + b
        for name, dst in copies:
            src = seg.columns[name].array
            if seg.index is None:
                np.copyto(dst[r:r + hi - lo], src[lo:hi])
            else:
                # mode="clip": the default ("raise") writes into a temporary first and copies it to
                # ``out`` afterwards; these indices are a permutation's, always in range.
                np.take(src, seg.index[lo:hi], axis=0, out=dst[r:r + hi - lo], mode="clip")
        r += hi - lo
    return out


def batch_table(pieces: list[Piece]) -> pa.Table:
    """The batch made of ``pieces`` as one Arrow table, for a custom collate."""
    parts = [seg.rows(a, b) for seg, a, b in pieces]
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts)
