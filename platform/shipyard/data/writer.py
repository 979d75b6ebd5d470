"""Writes a source as Arrow IPC shards plus a manifest, to any storage URI.

Each shard is one object, uploaded in one PUT; the manifest goes last. A crash mid-way
leaves no manifest (or the previous one removed first when overwriting), so readers never
see a half-written dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from shipyard import storage
from shipyard.data.manifest import MANIFEST, Manifest, ShardInfo
from shipyard.data.sources import Source
from shipyard.errors import DataError

# Parquet row groups. An Arrow shard is one record batch, so that each of its columns is one
# buffer the stream gathers rows from directly (shards with several record batches still read,
# at the cost of one copy per shard to join them: see gather.py).
RECORD_BATCH_ROWS = 8192


FORMATS = ("arrow", "parquet")


def shard_name(i: int, fmt: str = "arrow") -> str:
    return f"shard-{i:05d}.{fmt}"


def encode_shard(table: pa.Table, fmt: str) -> pa.Buffer:
    """One shard's bytes: an Arrow IPC file of one record batch, or Parquet (row groups of RECORD_BATCH_ROWS)."""
    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, sink, row_group_size=RECORD_BATCH_ROWS)
    else:
        with pa.ipc.new_file(sink, table.schema) as w:
            for batch in table.combine_chunks().to_batches():
                w.write_batch(batch)
    return sink.getvalue()


def write_dataset(source: Source, dest: str, rows_per_shard: int, *, overwrite: bool = False,
                  fmt: str = "arrow", on_rows: Callable[[int], None] = lambda n: None) -> Manifest:
    if fmt not in FORMATS:
        raise DataError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if rows_per_shard < 1:
        raise DataError(f"--rows-per-shard: got {rows_per_shard}; must be >= 1")
    fs, root = storage.filesystem(dest)
    mpath = storage.join(root, MANIFEST)
    storage.ensure_dir(fs, root)
    try:
        return _write(source, dest, fs, root, mpath, rows_per_shard, overwrite, fmt, on_rows)
    except FileNotFoundError:
        raise DataError(f"{dest}: bucket or directory does not exist") from None
    except PermissionError as e:
        raise DataError(f"{dest}: access denied ({e})") from None


def _write(source, dest, fs, root, mpath, rows_per_shard, overwrite, fmt, on_rows) -> Manifest:
    if fs.exists(mpath):
        if not overwrite:
            raise DataError(f"{dest}: a dataset already exists here; pass --overwrite to replace it")
        fs.rm_file(mpath)  # the old dataset stops being visible before any shard changes

    shards: list[ShardInfo] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        table = pa.Table.from_batches(pending, schema=source.schema)
        data = encode_shard(table, fmt)
        name = shard_name(len(shards), fmt)
        fs.pipe_file(storage.join(root, name), data.to_pybytes())
        shards.append(ShardInfo(name, table.num_rows, data.size))
        on_rows(table.num_rows)
        pending, pending_rows = [], 0

    for batch in source.batches:
        while batch.num_rows:
            take = min(batch.num_rows, rows_per_shard - pending_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == rows_per_shard:
                flush()
    if pending_rows:
        flush()
    if not shards:
        raise DataError(f"{source.description}: source has no rows")

    keep = {s.name for s in shards}
    for stale in fs.glob(storage.join(root, "shard-*")):
        if stale.rsplit("/", 1)[-1] not in keep:
            fs.rm_file(stale)
    manifest = Manifest(uri=dest, format=fmt, schema=source.schema, shards=tuple(shards))
    fs.pipe_file(mpath, manifest.to_json().encode())
    return manifest
