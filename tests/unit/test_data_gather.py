"""The stream's direct gather and its batches assembled ahead: same batches as the table path
(``to_torch`` over Arrow ``take``), writable, never aliasing a later batch, and a position that
is the last batch handed out however far the background thread has run."""

import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.data import ShardStream
from shipyard.data.gather import to_torch
from shipyard.data.sources import Source, open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import DataError

ROWS = 300


def table(rows: int = ROWS) -> pa.Table:
    """One column of every kind the stream handles: fixed-width ones (gathered) and the rest."""
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64)
    nullable = pa.array([None if i % 7 == 3 else int(i) for i in ids], pa.int64())
    return pa.table({
        "id": ids,
        "i8": pa.array((ids % 100).astype(np.int8)),
        "u16": pa.array(ids.astype(np.uint16)),
        "u32": pa.array(ids.astype(np.uint32)),
        "u64": pa.array(ids.astype(np.uint64)),
        "f16": pa.array(ids.astype(np.float16)),
        "f64": pa.array(ids * 0.25),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(rows * 5, dtype=np.float32)), 5),
        "tok": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 255, rows * 3).astype(np.uint8)), 3),
        "flag": pa.array(ids % 2 == 0),
        "maybe": nullable,  # null in some rows: float64 with NaN where the batch has a null, else int64
        "name": pa.array([f"r{i}" for i in ids]),
    })


def write(tmp_path, name, t, rows_per_shard, fmt="arrow", batches_per_shard=None):
    dest = str(tmp_path / name)
    write_dataset(Source(name, t.schema, t.num_rows, iter(t.to_batches())), dest, rows_per_shard, fmt=fmt)
    if batches_per_shard:  # shards as written before one record batch per shard
        for f in sorted((tmp_path / name).glob("shard-*.arrow")):
            shard = pa.ipc.open_file(pa.OSFile(str(f))).read_all()
            with pa.ipc.new_file(str(f), shard.schema) as w:
                for b in shard.to_batches(max_chunksize=-(-shard.num_rows // batches_per_shard)):
                    w.write_batch(b)
    return dest


def reference(t: pa.Table) -> dict:
    return to_torch(t)  # not `to_torch` itself: a custom collate, so the stream takes the table path


def same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, (k, x, y)
            assert torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                               y.view(torch.uint8) if y.dtype.is_floating_point else y), k
        else:
            assert x == y, k


def both(uri, **kw):
    fast = list(ShardStream(uri, **kw))
    slow = list(ShardStream(uri, collate=reference, **kw))
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow):
        same(f, s)
    return fast


@pytest.mark.parametrize("fmt,batches_per_shard", [("arrow", None), ("arrow", 3), ("parquet", None)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_gathered_batches_equal_the_table_collate(tmp_path, fmt, batches_per_shard, shuffle):
    uri = write(tmp_path, "ds", table(), 64, fmt, batches_per_shard)
    for world, batch in ((1, 17), (2, 64), (3, 5)):  # batches inside a shard and across shards
        for rank in range(world):
            out = both(uri, batch_size=batch, rank=rank, world=world, seed=3, shuffle=shuffle, epochs=2)
            assert out[0]["x"].shape[1:] == (5,) and out[0]["tok"].dtype == torch.uint8


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 120), rows_per_shard=st.sampled_from([1, 7, 30, 500]), batch=st.integers(1, 40),
       seed=st.integers(0, 99), shuffle=st.booleans(), world=st.integers(1, 3), ready=st.sampled_from([0, 1, 3]))
def test_gather_matches_table_path_anywhere(tmp_path_factory, rows, rows_per_shard, batch, seed, shuffle, world, ready):
    t = table(rows).select(["id", "u32", "x", "maybe"])
    uri = write(tmp_path_factory.mktemp("g"), "ds", t, rows_per_shard)
    for rank in range(world):
        both(uri, batch_size=batch, rank=rank, world=world, seed=seed, shuffle=shuffle, ready_batches=ready)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_writable_and_never_alias_what_comes_later(tmp_path, shuffle):
    uri = write(tmp_path, "ds", table(), 50)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable NumPy array" warning
        seen = []
        for b in ShardStream(uri, batch_size=20, seed=1, shuffle=shuffle, epochs=2):
            seen.append(b["id"].clone())
            b["x"] += 1000.0  # in place, as a user's augmentation might
            b["id"].numpy()[:] = -1
            first = first if first is not None else b
    epoch1, epoch2 = torch.cat(seen[:15]), torch.cat(seen[15:])
    assert (epoch1 >= 0).all() and (epoch2 >= 0).all(), "a write showed up in a later batch"
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) == list(range(ROWS))
    fresh = list(ShardStream(uri, batch_size=20, seed=1, shuffle=shuffle))
    assert float(fresh[0]["x"].max()) < 1.0 and float(first["x"].min()) >= 1000.0


def test_unshuffled_batches_inside_a_local_shard_are_views(tmp_path):
    uri = write(tmp_path, "ds", table(), 100)
    batches = list(ShardStream(uri, batch_size=25, shuffle=False))
    a, b = batches[0]["x"], batches[1]["x"]
    # consecutive batches of one shard share its column buffer: no copy was made
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    shuffled = list(ShardStream(uri, batch_size=25, shuffle=True))
    assert shuffled[0]["x"].untyped_storage().nbytes() == shuffled[0]["x"].nbytes  # its own buffer


def test_new_arrow_shards_are_one_record_batch(tmp_path):
    write(tmp_path, "ds", table(), 128)
    for f in (tmp_path / "ds").glob("shard-*.arrow"):
        assert pa.ipc.open_file(pa.OSFile(str(f))).num_record_batches == 1


def make_ids(tmp_path, rows=1000, rows_per_shard=97):
    t = pa.table({"id": np.arange(rows, dtype=np.int64)})
    return write(tmp_path, "ids", t, rows_per_shard)


def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_state_is_the_last_batch_handed_out_not_the_last_one_assembled(tmp_path):
    uri = make_ids(tmp_path)
    kw = dict(batch_size=32, rank=1, world=2, seed=5, epochs=3)
    states_sync, ids_sync = [], []
    s = ShardStream(uri, ready_batches=0, **kw)
    for b in s:
        ids_sync.append(b["id"].tolist())
        states_sync.append(s.state_dict())
    for stop_after in (1, 14, 15, 16, 17, 31, 40):  # 16 batches per epoch: inside and at boundaries
        s = ShardStream(uri, ready_batches=8, **kw)
        it = iter(s)
        head = [next(it)["id"].tolist() for _ in range(stop_after)]
        wait_until(lambda: s.prefetched == min(8, len(ids_sync) - stop_after))  # the thread is ahead
        state = s.state_dict()
        assert state == states_sync[stop_after - 1]
        it.close()
        resumed = ShardStream(uri, ready_batches=8, **kw)
        resumed.load_state_dict(state)
        assert resumed.remaining_batches == len(ids_sync) - stop_after
        assert head + [b["id"].tolist() for b in resumed] == ids_sync


def test_batches_wait_ready_while_the_step_runs(tmp_path):
    uri = make_ids(tmp_path)
    s = ShardStream(uri, batch_size=10, ready_batches=5)
    it = iter(s)
    next(it)
    wait_until(lambda: s.prefetched == 5)  # a "training step" later, five batches are ready
    t0 = time.perf_counter()
    for _ in range(5):
        next(it)
    assert time.perf_counter() - t0 < 1.0
    it.close()


def test_closing_early_stops_the_background_thread(tmp_path):
    uri = make_ids(tmp_path)
    before = {t.ident for t in threading.enumerate()}
    it = iter(ShardStream(uri, batch_size=10, ready_batches=2))
    next(it)
    it.close()  # returns once the thread has ended
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "shipyard-batches"]


def test_a_stopped_producer_leaves_a_wait_on_a_read_that_never_comes():
    from concurrent.futures import Future

    from shipyard.data.prefetch import Stopped, wait

    stop = threading.Event()
    stop.set()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        wait(Future(), stop)  # e.g. a read the interpreter's exit cancelled before it ran
    assert time.monotonic() - t0 < 2


EXIT_SCRIPT = """
import sys
from shipyard.data import ShardStream
kept = []
for seed in range(4):
    it = iter(ShardStream(sys.argv[1], batch_size=8, seed=seed, ready_batches=2, prefetch=2))
    next(it)
    kept.append(it)  # never closed: the process exits with every producer mid-epoch
print("bye", flush=True)
"""


def test_exiting_with_streams_still_open_exits_cleanly(tmp_path):
    import subprocess
    import sys

    uri = make_ids(tmp_path, rows=5000, rows_per_shard=500)
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "bye", p.stderr[-2000:]


def test_an_error_in_the_background_reaches_the_caller_after_the_good_batches(tmp_path):
    uri = make_ids(tmp_path, rows=100, rows_per_shard=50)
    (tmp_path / "ids" / "shard-00001.arrow").write_bytes(b"not arrow")
    s = ShardStream(uri, batch_size=10, shuffle=False, ready_batches=4)
    got = []
    with pytest.raises(DataError, match="shard-00001.arrow: shard is corrupt"):
        for b in s:
            got.extend(b["id"].tolist())
    assert got == list(range(50)) and s.state_dict()["consumed"] == 50


def test_a_custom_collate_gets_the_arrow_rows(tmp_path):
    uri = make_ids(tmp_path, rows=100, rows_per_shard=30)
    out = list(ShardStream(uri, batch_size=16, seed=2, collate=lambda t: t))
    assert all(isinstance(t, pa.Table) for t in out)
    ids = [i for t in out for i in t["id"].to_pylist()]
    assert sorted(ids) == list(range(100))
    assert ids == [int(i) for b in ShardStream(uri, batch_size=16, seed=2) for i in b["id"]]


def test_pin_memory_true_needs_cuda(tmp_path):
    uri = make_ids(tmp_path, rows=10, rows_per_shard=10)
    if torch.cuda.is_available():
        b = next(iter(ShardStream(uri, batch_size=4, pin_memory=True)))
        assert b["id"].is_pinned()
    else:
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            ShardStream(uri, batch_size=4, pin_memory=True)
        assert not next(iter(ShardStream(uri, batch_size=4)))["id"].is_pinned()


def test_parquet_source_unchanged(tmp_path):
    src = tmp_path / "s.parquet"
    pq.write_table(table(50).select(["id", "x"]), src)
    dest = str(tmp_path / "pqds")
    write_dataset(open_source(str(src)), dest, 20)
    both(dest, batch_size=8, seed=4)


def test_memory_that_is_not_ours_is_copied_never_handed_out(tmp_path):
    """S3 reads give immutable ``bytes``: an unshuffled batch is then a copy, not a view."""
    from shipyard.data.gather import Rows, fixed_width, gather_batch

    t = table(40).select(["id", "x"])
    rows = Rows(t, None, 0, 40, fixed_width(t, ours=False))
    a = gather_batch([(rows, 0, 16)], ["id", "x"], pin=False)
    b = gather_batch([(rows, 16, 40)], ["id", "x"], pin=False)
    assert a["x"].untyped_storage().nbytes() == a["x"].nbytes and a["id"].tolist() == list(range(16))
    a["x"].zero_()
    again = gather_batch([(rows, 0, 16)], ["id", "x"], pin=False)
    assert float(again["x"].abs().sum()) > 0 and b["id"].tolist() == list(range(16, 40))
