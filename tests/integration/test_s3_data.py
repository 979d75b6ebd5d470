"""The data path over the S3 protocol (moto server over HTTP): shard, manifest, per-rank streams."""

from collections import Counter

import pytest
import s3fs

from shipyard.data import ShardStream, read_manifest
from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import DataError

pytestmark = pytest.mark.integration


def test_shard_to_s3_and_stream_every_row_once(bucket, s3_endpoint):
    uri = f"s3://{bucket}/digits/train"
    manifest = write_dataset(open_source("sklearn:digits:train"), uri, rows_per_shard=300)
    assert [s.rows for s in manifest.shards] == [300, 300, 300, 300, 238]

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/digits/train"))
    assert names == ["manifest.json"] + [f"shard-{i:05d}.arrow" for i in range(5)]
    assert read_manifest(uri).schema.names == ["id", "x", "y"]

    seen = Counter()
    for rank in range(2):
        for batch in ShardStream(uri, batch_size=64, rank=rank, world=2, seed=5):
            assert batch["x"].shape[1] == 64
            seen.update(batch["id"].tolist())
    assert max(seen.values()) == 1 and len(seen) == 1438


def test_missing_shard_on_s3_is_named(bucket, s3_endpoint):
    uri = f"s3://{bucket}/d"
    write_dataset(open_source("sklearn:digits:test"), uri, rows_per_shard=100)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.rm(f"{bucket}/d/shard-00002.arrow")
    with pytest.raises(DataError, match=f"s3://{bucket}/d/shard-00002.arrow: shard listed in the manifest is missing"):
        for _ in ShardStream(uri, batch_size=50, shuffle=False):
            pass
