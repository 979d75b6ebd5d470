"""The shard manifest: which shards a dataset has, their row counts and sizes, and its schema.

The manifest is the dataset's commit record: readers trust only shards it lists, and the
writer puts it last.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from shipyard import storage
from shipyard.errors import DataError

MANIFEST = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    uri: str
    format: str
    schema: pa.Schema
    shards: tuple[ShardInfo, ...]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard_uri(self, i: int) -> str:
        return storage.join(self.uri, self.shards[i].name)

    def to_json(self) -> str:
        return json.dumps({
            "version": VERSION,
            "format": self.format,
            "rows": self.rows,
            "bytes": self.bytes,
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
            "columns": [{"name": f.name, "type": str(f.type)} for f in self.schema],
            "shards": [{"name": s.name, "rows": s.rows, "bytes": s.bytes} for s in self.shards],
        }, indent=1)


def read_manifest(uri: str) -> Manifest:
    """Read ``uri/manifest.json``; a missing or unreadable one is a :class:`DataError` naming the URI."""
    fs, path = storage.filesystem(uri)
    mpath = storage.join(path, MANIFEST)
    try:
        raw = json.loads(fs.cat_file(mpath))
    except FileNotFoundError:
        raise DataError(f"{uri}: no dataset here (no {MANIFEST}); write one with `shipyard data shard SRC {uri}`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{storage.join(uri, MANIFEST)}: not a valid shard manifest ({e})") from None
    except PermissionError as e:
        raise DataError(f"{uri}: access denied reading {MANIFEST}: {e}") from None
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw["schema"])))
        shards = tuple(ShardInfo(s["name"], int(s["rows"]), int(s["bytes"])) for s in raw["shards"])
        return Manifest(uri=uri, format=raw["format"], schema=schema, shards=shards)
    except (KeyError, TypeError, ValueError, pa.ArrowInvalid) as e:
        raise DataError(f"{storage.join(uri, MANIFEST)}: not a valid shard manifest (bad {e})") from None


def decode_shard(data: bytes, fmt: str) -> pa.Table:
    buf = pa.py_buffer(data)
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(buf))
    return pa.ipc.open_file(buf).read_all()


def _shard_schema(manifest: Manifest, i: int) -> pa.Schema:
    fs, path = storage.filesystem(manifest.shard_uri(i))
    with fs.open(path, "rb") as f:  # reads the footer only (range requests on S3)
        return pq.read_schema(f) if manifest.format == "parquet" else pa.ipc.open_file(f).schema


def check_shards(manifest: Manifest, threads: int = 16) -> None:
    """Before training: every shard exists and has the manifest's schema, or a DataError names it."""
    def check(i: int) -> None:
        uri = manifest.shard_uri(i)
        try:
            schema = _shard_schema(manifest, i)
        except FileNotFoundError:
            raise DataError(f"{uri}: shard listed in the manifest is missing") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{uri}: shard is corrupt or unreadable: {e}") from None
        if not schema.equals(manifest.schema):
            raise DataError(f"{uri}: shard schema differs from the manifest's:\n  {schema}\n  vs\n  {manifest.schema}")

    with ThreadPoolExecutor(min(threads, len(manifest.shards))) as pool:
        for _ in pool.map(check, range(len(manifest.shards))):
            pass
