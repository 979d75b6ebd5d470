"""Reading a dataset from S3 that misbehaves: throttling, 500s, dropped and reset connections.

A fault-injecting proxy (tests/integration/s3_fault_proxy.py) sits between s3fs and the moto
server and faults about 30% of the shard GETs; every rank must still read exactly the rows the
same read sees without faults, and every injected fault must show up as exactly one counted retry
of its kind in ``storage.retry_counts()``.
"""

import logging
from collections import Counter

import pytest
import s3fs

from shipyard import s3_retries, storage
from shipyard.data import ShardStream
from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset

from s3_fault_proxy import KINDS, FaultProxy

pytestmark = pytest.mark.integration

WORLD = 2
ROWS = 1438  # sklearn digits, train split
# What each of the proxy's faults must be counted as.
KIND_OF_FAULT = {"slowdown": "throttled", "internal": "server_error", "reset": "connection", "truncate": "body_read"}


def read_epoch(uri: str) -> tuple[Counter, list[int]]:
    """The ids every rank reads in one epoch (multiset), and each rank's batch count."""
    seen, steps = Counter(), []
    for rank in range(WORLD):
        stream = ShardStream(uri, batch_size=64, rank=rank, world=WORLD, seed=1)
        n = 0
        for batch in stream:
            seen.update(batch["id"].tolist())
            n += 1
        assert n == stream.batches_per_epoch
        steps.append(n)
    return seen, steps


def test_epoch_survives_s3_faults(bucket, s3_endpoint, monkeypatch, caplog):
    uri = f"s3://{bucket}/digits/train"
    manifest = write_dataset(open_source("sklearn:digits:train"), uri, rows_per_shard=100)
    assert manifest.rows == ROWS and len(manifest.shards) == 15

    # Without faults: every row once, less the remainder drop_remainder drops (ROWS % WORLD).
    expected, expected_steps = read_epoch(uri)
    assert max(expected.values()) == 1 and sum(expected.values()) == ROWS - ROWS % WORLD

    # Earlier tests' retries must neither mute this test's warning nor be summed into it.
    monkeypatch.setattr(s3_retries, "_last_log", float("-inf"))
    monkeypatch.setattr(s3_retries, "_unlogged", Counter())
    caplog.set_level(logging.WARNING, logger="shipyard.s3_retries")
    before = storage.retry_counts()
    # Faults are a pure function of (seed, object key, attempt), so this run's are fixed: seed 5
    # gives 5 SlowDown, 2 InternalError, 2 truncated bodies and 2 resets over ~28 shard GETs.
    with FaultProxy(s3_endpoint, rate=0.3, seed=5, lifetime=120) as proxy:
        monkeypatch.setenv("SHIPYARD_S3_ENDPOINT", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # a fresh client, pointed at the proxy
        try:
            seen, steps = read_epoch(uri)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    retried = {kind: n - before[kind] for kind, n in storage.retry_counts().items()}

    assert seen == expected
    assert steps == expected_steps
    shard_gets = [e for e in proxy.log if e[0] == "GET" and "/shard-" in e[1]]
    assert {p for _, p, _ in shard_gets} == {f"/{bucket}/digits/train/{s.name}" for s in manifest.shards}
    for kind in KINDS:
        assert proxy.counts[kind] >= 1, f"no {kind} fault injected: {dict(proxy.counts)}"
    assert 0.15 < proxy.faults / len(shard_gets) < 0.6, (dict(proxy.counts), len(shard_gets))

    # Each fault cost exactly one retry, counted once, as its kind: SlowDown and 500 by botocore's
    # retries, resets by aiohttp's resend (botocore's when two come in a row), truncated bodies by
    # s3fs's. Nothing else was retried.
    expected_retries = {kind: 0 for kind in s3_retries.KINDS}
    for fault, kind in KIND_OF_FAULT.items():
        expected_retries[kind] += proxy.counts[fault]
    assert retried == expected_retries, dict(proxy.counts)
    # Users are told, once, not once per retry (the next summary waits s3_retries.LOG_EVERY_S).
    warnings = [r.getMessage() for r in caplog.records if r.name == "shipyard.s3_retries"]
    assert len(warnings) == 1 and warnings[0].startswith("S3: retried 1 transient error"), warnings
