"""Shard writer and per-rank stream, on local disk (the S3 path is in tests/integration)."""

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from shipyard.data import ShardStream, read_manifest
from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import DataError

REPO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "digits" / "job.yaml"


def make_dataset(tmp_path, rows=1000, rows_per_shard=97, name="ds"):
    table = pa.table({"id": np.arange(rows, dtype=np.int64), "v": np.arange(rows, dtype=np.float32) * 0.5})
    src = tmp_path / f"{name}.parquet"
    pq.write_table(table, src, row_group_size=128)
    dest = str(tmp_path / name)
    write_dataset(open_source(str(src)), dest, rows_per_shard)
    return dest


def ids_of(stream):
    return [int(i) for batch in stream for i in batch["id"]]


def test_shard_round_trip_rows_schema_manifest(tmp_path):
    dest = make_dataset(tmp_path, rows=1000, rows_per_shard=300)
    m = read_manifest(dest)
    assert [s.rows for s in m.shards] == [300, 300, 300, 100]
    assert m.rows == 1000 and m.schema.names == ["id", "v"]
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert [s["bytes"] for s in on_disk["shards"]] == [(tmp_path / "ds" / s["name"]).stat().st_size for s in on_disk["shards"]]
    ids = ids_of(ShardStream(dest, batch_size=64, shuffle=False))
    assert ids == list(range(1000))


def test_csv_and_directory_sources(tmp_path):
    src = tmp_path / "csvs"
    src.mkdir()
    for part in range(3):
        pacsv.write_csv(pa.table({"id": list(range(part * 10, part * 10 + 10))}), src / f"p{part}.csv")
    write_dataset(open_source(str(src)), str(tmp_path / "out"), 7)
    assert sorted(ids_of(ShardStream(str(tmp_path / "out"), batch_size=5))) == list(range(30))


def test_sklearn_digits_splits_are_disjoint_and_complete(tmp_path):
    train, test = open_source("sklearn:digits:train"), open_source("sklearn:digits:test")
    train_ids = pa.Table.from_batches(list(train.batches))["id"].to_pylist()
    test_ids = pa.Table.from_batches(list(test.batches))["id"].to_pylist()
    assert not set(train_ids) & set(test_ids)
    assert sorted(train_ids + test_ids) == list(range(1797))


def test_existing_dataset_needs_overwrite(tmp_path):
    dest = make_dataset(tmp_path, rows=100, rows_per_shard=10)
    with pytest.raises(DataError, match="already exists here; pass --overwrite"):
        write_dataset(open_source(str(tmp_path / "ds.parquet")), dest, 10)
    write_dataset(open_source("sklearn:digits:test"), dest, 1000, overwrite=True)
    assert read_manifest(dest).rows == 359
    assert len(list((tmp_path / "ds").glob("shard-*"))) == 1  # stale shards removed


def test_bad_sources_and_missing_dataset_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.parquet: source does not exist"):
        open_source(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="unknown built-in dataset"):
        open_source("sklearn:iris")
    with pytest.raises(DataError, match=f"{tmp_path}/missing: no dataset here"):
        read_manifest(str(tmp_path / "missing"))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_once_per_epoch_across_ranks(tmp_path, world):
    dest = make_dataset(tmp_path, rows=1000, rows_per_shard=97)
    per_rank = [ids_of(ShardStream(dest, batch_size=32, rank=r, world=world, seed=7)) for r in range(world)]
    assert len({len(ids) for ids in per_rank}) == 1, "ranks must take the same number of rows (DDP lock-step)"
    seen = Counter(i for ids in per_rank for i in ids)
    assert max(seen.values()) == 1
    assert len(seen) == 1000 - 1000 % world  # the documented remainder is dropped


def test_order_is_deterministic_and_changes_per_epoch(tmp_path):
    dest = make_dataset(tmp_path)
    a = ids_of(ShardStream(dest, batch_size=50, seed=3, epochs=2))
    b = ids_of(ShardStream(dest, batch_size=50, seed=3, epochs=2))
    assert a == b
    assert a[:1000] != a[1000:] and sorted(a[:1000]) == sorted(a[1000:])
    assert a != ids_of(ShardStream(dest, batch_size=50, seed=4, epochs=2))


def test_resume_from_state_dict_continues_exactly(tmp_path):
    dest = make_dataset(tmp_path)
    full = [ids_of(ShardStream(dest, batch_size=32, rank=r, world=2, seed=1, epochs=3)) for r in range(2)]
    for stop_after in (1, 15, 16, 17, 40):  # 16 batches per epoch per rank: cut inside and at boundaries
        for r in range(2):
            s = ShardStream(dest, batch_size=32, rank=r, world=2, seed=1, epochs=3)
            it = iter(s)
            head = [int(i) for _ in range(stop_after) for i in next(it)["id"]]
            state = s.state_dict()
            resumed = ShardStream(dest, batch_size=32, rank=r, world=2, seed=1, epochs=3)
            resumed.load_state_dict(state)
            assert head + ids_of(resumed) == full[r], f"rank {r} cut after {stop_after} batches"


def test_corrupt_and_missing_shards_are_named(tmp_path):
    dest = make_dataset(tmp_path, rows=100, rows_per_shard=50)
    (tmp_path / "ds" / "shard-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="shard-00001.arrow: shard is corrupt"):
        ids_of(ShardStream(dest, batch_size=10, shuffle=False))
    (tmp_path / "ds" / "shard-00001.arrow").unlink()
    with pytest.raises(DataError, match="shard-00001.arrow: shard listed in the manifest is missing"):
        ids_of(ShardStream(dest, batch_size=10, shuffle=False))


def test_parquet_shards_stream_like_arrow(tmp_path):
    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"id": np.arange(500, dtype=np.int64)}), src)
    m = write_dataset(open_source(str(src)), str(tmp_path / "pq"), 120, fmt="parquet")
    assert m.format == "parquet" and (tmp_path / "pq" / "shard-00000.parquet").exists()
    arrow = write_dataset(open_source(str(src)), str(tmp_path / "ipc"), 120)
    a = ids_of(ShardStream(str(tmp_path / "pq"), batch_size=16, rank=1, world=2, seed=9))
    b = ids_of(ShardStream(str(tmp_path / "ipc"), batch_size=16, rank=1, world=2, seed=9))
    assert a == b and arrow.rows == m.rows
    with pytest.raises(DataError, match="--format: got 'csv'; allowed: arrow, parquet"):
        write_dataset(open_source(str(src)), str(tmp_path / "x"), 10, fmt="csv")


def test_check_shards_names_bad_shard_before_training(tmp_path):
    from shipyard.data.manifest import check_shards
    from shipyard.data.writer import encode_shard

    dest = make_dataset(tmp_path, rows=100, rows_per_shard=25)
    check_shards(read_manifest(dest))  # all good
    other = pa.table({"id": pa.array(np.arange(25), pa.int32()), "v": pa.array(np.zeros(25, np.float32))})
    (tmp_path / "ds" / "shard-00002.arrow").write_bytes(encode_shard(other, "arrow").to_pybytes())
    with pytest.raises(DataError, match="shard-00002.arrow: shard schema differs from the manifest's"):
        check_shards(read_manifest(dest))
    (tmp_path / "ds" / "shard-00002.arrow").write_bytes(b"garbage")
    with pytest.raises(DataError, match="shard-00002.arrow: shard is corrupt or unreadable"):
        check_shards(read_manifest(dest))


def test_run_with_a_corrupt_shard_exits_2_naming_it(tmp_path, shipyard):
    dest = make_dataset(tmp_path, rows=100, rows_per_shard=25)
    (tmp_path / "ds" / "shard-00003.arrow").write_bytes(b"garbage")
    r = shipyard("run", str(REPO_JOB), "--set", f"dataset.uri={dest}", "--set", "dataset.eval_uri=null",
                 "--set", f"checkpoint.uri={tmp_path / 'ck'}")
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"error: dataset.uri: {dest}/shard-00003.arrow: shard is corrupt or unreadable")
    assert "Traceback" not in r.stdout + r.stderr
