"""Where `shipyard data shard` reads from: tabular files (Parquet, CSV, Arrow), text files as
byte-level token blocks (``text:GLOB``), or a built-in dataset.

Every source is a schema plus an iterator of record batches, so a large source is streamed,
never held in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shipyard import storage
from shipyard.errors import DataError

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


@dataclass
class Source:
    description: str
    schema: pa.Schema
    total_rows: int | None
    batches: Iterator[pa.RecordBatch]


def open_source(src: str) -> Source:
    if src.startswith("sklearn:"):
        return _sklearn(src)
    if src.startswith("text:"):
        return _text(src)
    fs, path = storage.filesystem(src)
    if not fs.exists(path):
        raise DataError(f"{src}: source does not exist")
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if _kind(f))
        if not files:
            raise DataError(f"{src}: directory has no .parquet, .csv or .arrow files")
    else:
        if not _kind(path):
            raise DataError(f"{src}: unknown file type; use .parquet, .csv or .arrow (or sklearn:digits)")
        files = [path]
    return _files(src, fs, files)


def _kind(path: str) -> str | None:
    for suffix, kind in SUFFIXES.items():
        if path.lower().endswith(suffix):
            return kind
    return None


def _open_one(fs, path: str) -> tuple[pa.Schema, int | None, Iterator[pa.RecordBatch]]:
    kind = _kind(path)
    f = fs.open(path, "rb")
    if kind == "parquet":
        pf = pq.ParquetFile(f)
        return pf.schema_arrow, pf.metadata.num_rows, pf.iter_batches(batch_size=65536)
    if kind == "csv":
        reader = pacsv.open_csv(f)
        return reader.schema, None, iter(reader)
    try:
        reader = pa.ipc.open_file(f)
        return reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)), (
            reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        f.seek(0)
        stream = pa.ipc.open_stream(f)
        return stream.schema, None, iter(stream)


def _files(src: str, fs, files: list[str]) -> Source:
    opened = []
    for path in files:
        try:
            opened.append((path, *_open_one(fs, path)))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: cannot read as {_kind(path)}: {e}") from None
    schema = opened[0][1]
    for path, s, _, _ in opened[1:]:
        if not s.equals(schema):
            raise DataError(f"{path}: schema differs from {opened[0][0]}:\n  {s}\n  vs\n  {schema}")
    totals = [n for _, _, n, _ in opened]
    total = None if None in totals else sum(totals)

    def batches() -> Iterator[pa.RecordBatch]:
        for _, _, _, it in opened:
            yield from it

    return Source(f"{src} ({len(files)} file{'s' * (len(files) != 1)})", schema, total, batches())


def _sklearn(src: str) -> Source:
    """``sklearn:digits`` (all 1,797 rows), ``sklearn:digits:train`` (80%) or ``:test`` (20%).

    The split is a fixed permutation (seed 0), so train and test never share a row. Columns:
    ``id`` (the row's index in scikit-learn's data), ``x`` (64 pixels scaled to [0, 1]), ``y``.
    """
    parts = src.split(":")
    if parts[1] != "digits" or len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("train", "test")):
        raise DataError(f"{src}: unknown built-in dataset; available: sklearn:digits, sklearn:digits:train, sklearn:digits:test")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(f"{src}: needs scikit-learn (pip install 'shipyard[sklearn]')") from None
    d = load_digits()
    ids = np.arange(len(d.target))
    if len(parts) == 3:
        perm = np.random.default_rng(0).permutation(len(ids))
        n_test = len(ids) // 5
        ids = np.sort(perm[:n_test] if parts[2] == "test" else perm[n_test:])
    x = (d.data[ids] / 16.0).astype(np.float32)
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
        "y": pa.array(d.target[ids], pa.int64()),
    })
    return Source(src, table.schema, table.num_rows, iter(table.to_batches()))


TEXT_BLOCK = 257  # 256 tokens of context plus the next-token target of the last one
_TEXT_OPTION = re.compile(r"^(?P<key>block)=(?P<value>\d+)$")


def _text(src: str) -> Source:
    """``text:GLOB[:block=N]``: text files as byte-level language-model rows.

    The files matching GLOB (any URI; ``**`` recurses), in sorted path order, are read as bytes
    and joined with a 0 byte between documents (source text has none, so it marks a document
    boundary). The stream is cut into non-overlapping blocks of ``block`` tokens (default 257:
    a 256-token context plus one target); the incomplete last block is dropped. One column:
    ``tokens``, a fixed-size list of ``block`` uint8 (the byte values are the token ids, vocab 256).
    """
    spec = src[len("text:"):]
    block = TEXT_BLOCK
    while ":" in spec and (m := _TEXT_OPTION.match(spec.rsplit(":", 1)[1])):
        block = int(m["value"])
        spec = spec.rsplit(":", 1)[0]
    if block < 2:
        raise DataError(f"{src}: block must be at least 2 tokens (a context and a target)")
    fs, pattern = storage.filesystem(spec)
    files = sorted(f for f in fs.glob(pattern) if fs.isfile(f))
    if not files:
        raise DataError(f"{src}: no files match {spec}")
    total_bytes = sum(fs.size(f) for f in files) + len(files) - 1
    schema = pa.schema([("tokens", pa.list_(pa.uint8(), block))])

    def batches() -> Iterator[pa.RecordBatch]:
        rows_per_batch = 8192
        buf = bytearray()
        for i, path in enumerate(files):
            if i:
                buf += b"\0"
            buf += fs.cat_file(path)
            while len(buf) >= block * rows_per_batch:
                yield _token_rows(bytes(buf[:block * rows_per_batch]), block, schema)
                del buf[:block * rows_per_batch]
        n = len(buf) // block
        if n:
            yield _token_rows(bytes(buf[:n * block]), block, schema)

    return Source(f"{src} ({len(files)} file{'s' * (len(files) != 1)}, {total_bytes:,} bytes)", schema,
                  total_bytes // block, batches())


def _token_rows(data: bytes, block: int, schema: pa.Schema) -> pa.RecordBatch:
    values = pa.array(np.frombuffer(data, dtype=np.uint8))
    return pa.RecordBatch.from_arrays([pa.FixedSizeListArray.from_arrays(values, block)], schema=schema)
