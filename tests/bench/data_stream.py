"""Read throughput and time to first batch of shipyard's ShardStream, against raw pyarrow and Ray Data.

One synthetic dataset (``id`` int64, ``x`` fixed_size_list<float32>[256], ``y`` int64: ~1 KB/row;
``--mb`` MB, default 200; ``--quick`` ~30 MB) is written once with shipyard's own shard writer as
Arrow IPC shards, to local disk and to a moto S3 server on 127.0.0.1 (started here, stopped at the end).
For each store, one JSON line per measurement:

- ``raw_pyarrow``: every shard read once, sequentially, no prefetch, no shuffle, no tensors
  (local: ``pa.OSFile`` + ``read_all``, which reads the bytes into memory as shipyard's
  ``cat_file`` does; S3: the same s3fs filesystem shipyard uses, ``cat_file`` + ``read_all``).
  The floor for "just getting the bytes into Arrow". Local also gets ``raw_pyarrow_mmap``
  (``pa.memory_map``): zero-copy, it maps the file and never touches the data, so it is an
  upper bound no reader that delivers the values can reach; its ratio is printed for reference.
- ``shipyard``: ``ShardStream(uri, batch_size, rank, world, seed=0, shuffle=True)`` iterated to the
  end, every batch collated by the default ``to_torch`` (dicts of tensors, one copy) -- that cost is
  included on purpose, it is what a training loop gets. world=1 is rank 0 alone; world=2 runs both
  ranks concurrently in 2 *processes* (spawned; each warmed up with one batch, then timed from a
  common barrier), and its
  rows/s is all rows of both ranks over the wall time of the slower rank.
- ``shipyard_noshuffle`` (attribution only): same as world=1 with ``shuffle=False``, to show how much
  of the gap is the in-shard row permutation.
- ``ray_data``: ``ray.data.read_parquet(...).iter_torch_batches(batch_size)`` consuming everything.
  Ray has no Arrow IPC reader, so the same rows are also written as *uncompressed* Parquet files,
  one per shard (same row count) next to the shards; Ray reads in file order (no shuffle: this favours
  Ray). ``ray.init(num_cpus=2)`` happens once, outside the timing. S3 uses pyarrow's S3FileSystem.
- ``ttfb_fresh``: seconds from constructing a ShardStream (manifest read included) to its first batch.
- ``ttfb_resume``: the same for a new stream given ``load_state_dict(state)``, where ``state`` is the
  ``state_dict()`` of a stream that consumed 90% of its batches (so no dependence on its fields).

rows/s count rows handed to the caller; MB/s is rows/s x the dataset's average shard bytes per row,
so all readers are on the same scale. Each throughput run is done ``--repeats`` times (default 2) and
the fastest is kept; TTFBs are the median of 5. Same data, same process, warm page cache / same moto
server for every reader, so the comparison is fair up to noise: the machine has 2 cores and other
work may run on it, expect +-10% run to run. Ratio lines at the end compare against the goals.

Run: python tests/bench/data_stream.py [--mb N] [--quick] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shipyard import storage
from shipyard.data import ShardStream, read_manifest
from shipyard.data.sources import Source
from shipyard.data.writer import write_dataset

BATCH = 256
DIM = 256
BUCKET = "bench"


def emit(**kw) -> None:
    print(json.dumps({"bench": "data_stream", **kw}), flush=True)


def make_dataset(dest: str, rows: int, rows_per_shard: int, parquet_dir: str) -> None:
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), DIM)), ("y", pa.int64())])

    def batches():
        for lo in range(0, rows, rows_per_shard):
            n = min(rows_per_shard, rows - lo)
            x = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * DIM, dtype=np.float32)), DIM)
            b = pa.record_batch([pa.array(np.arange(lo, lo + n)), x, pa.array(rng.integers(0, 10, n))], schema=schema)
            pq.write_table(pa.Table.from_batches([b]), os.path.join(parquet_dir, f"part-{lo // rows_per_shard:05d}.parquet"),
                           compression="none")
            yield b

    write_dataset(Source("synthetic", schema, rows, batches()), dest, rows_per_shard)


def raw_pyarrow(uri: str, mmap: bool = False) -> int:
    m, rows = read_manifest(uri), 0
    for i in range(len(m.shards)):
        u = m.shard_uri(i)
        if u.startswith("s3://"):
            fs, path = storage.filesystem(u)
            t = pa.ipc.open_file(pa.py_buffer(fs.cat_file(path))).read_all()
        else:  # OSFile reads the bytes into memory; memory_map is zero-copy and never touches them
            t = pa.ipc.open_file(pa.memory_map(u) if mmap else pa.OSFile(u)).read_all()
        rows += t.num_rows
    return rows


def shipyard_rank(uri: str, rank: int = 0, world: int = 1, shuffle: bool = True, barrier=None, q=None) -> int:
    if barrier is not None:  # a fresh process: warm it up (one batch: imports, s3fs client, lazy
        # library init, ~0.25 s) before the clock starts, as the world=1 run's process already is
        it = iter(ShardStream(uri, batch_size=BATCH, rank=rank, world=world, seed=0, shuffle=shuffle))
        next(it)
        it.close()
        barrier.wait()
    t0, rows = time.perf_counter(), 0
    for b in ShardStream(uri, batch_size=BATCH, rank=rank, world=world, seed=0, shuffle=shuffle):
        rows += len(b["id"])
    if q is not None:
        q.put((rows, time.perf_counter() - t0))
    return rows


def shipyard_world2(uri: str) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=shipyard_rank, args=(uri, r, 2, True, barrier, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(r for r, _ in res), max(s for _, s in res)


def ray_data(path: str, filesystem) -> int:
    import ray
    rows = 0
    for b in ray.data.read_parquet(path, filesystem=filesystem).iter_torch_batches(batch_size=BATCH):
        rows += len(b["id"])
    return rows


def best_of(repeats: int, fn, *args) -> tuple[int, float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        runs.append(out if isinstance(out, tuple) else (out, time.perf_counter() - t0))
    return min(runs, key=lambda r: r[1])


def ttfb(uri: str, state: dict | None) -> float:
    t0 = time.perf_counter()
    s = ShardStream(uri, batch_size=BATCH, rank=0, world=1, seed=0, shuffle=True)
    if state is not None:
        s.load_state_dict(state)
    it = iter(s)
    next(it)
    dt = time.perf_counter() - t0
    it.close()
    return dt


def state_at_90(uri: str) -> dict:
    s = ShardStream(uri, batch_size=BATCH, rank=0, world=1, seed=0, shuffle=True)
    stop = int(0.9 * s.batches_per_epoch)
    it = iter(s)
    for _ in range(stop):
        next(it)
    state = s.state_dict()
    it.close()
    return state


def bench_store(store: str, uri: str, bytes_per_row: float, repeats: int, res: dict) -> None:
    """Everything but Ray for one store (Ray runs after both stores: its worker start-up eats CPU)."""
    record = recorder(store, bytes_per_row, res)
    record("raw_pyarrow", *best_of(repeats, raw_pyarrow, uri))
    if store == "local":
        record("raw_pyarrow_mmap", *best_of(repeats, raw_pyarrow, uri, True))
    record("shipyard", *best_of(repeats, shipyard_rank, uri), world=1)
    record("shipyard_noshuffle", *best_of(repeats, shipyard_rank, uri, 0, 1, False), world=1)
    record("shipyard", *best_of(repeats, shipyard_world2, uri), world=2, workers="2 processes")
    state = state_at_90(uri)
    res[(store, "ttfb_fresh")] = fresh = statistics.median(ttfb(uri, None) for _ in range(5))
    res[(store, "ttfb_resume")] = resume = statistics.median(ttfb(uri, state) for _ in range(5))
    emit(store=store, reader="shipyard", metric="ttfb_fresh", seconds=round(fresh, 4))
    emit(store=store, reader="shipyard", metric="ttfb_resume_90pct", seconds=round(resume, 4), consumed=state["consumed"])


def recorder(store: str, bytes_per_row: float, res: dict):
    def record(reader: str, rows: int, seconds: float, **extra) -> None:
        res[(store, reader, extra.get("world", 1))] = rows / seconds
        emit(store=store, reader=reader, **extra, rows=rows, seconds=round(seconds, 3),
             rows_per_s=round(rows / seconds), mb_per_s=round(rows / seconds * bytes_per_row / 1e6, 1))
    return record


def ratios(store: str, res: dict) -> None:
    def ratio(name: str, num, den, goal: str) -> None:
        value = None if num is None or den is None else num / den
        ok = None if value is None else (value >= float(goal[2:]) if goal[0] == ">" else value <= float(goal[2:]))
        emit(store=store, ratio=name, value=None if value is None else round(value, 3), goal=goal, met=ok)

    sy = res[(store, "shipyard", 1)]
    ratio("shipyard_w1/raw_pyarrow", sy, res[(store, "raw_pyarrow", 1)], ">=0.9")
    if store == "local":
        ratio("shipyard_w1/raw_pyarrow_mmap", sy, res[(store, "raw_pyarrow_mmap", 1)], ">=0.9")
    ratio("shipyard_w1/ray_data", sy, res.get((store, "ray_data", 1)), ">=1.5")
    ratio("resume_ttfb/fresh_ttfb", res[(store, "ttfb_resume")], res[(store, "ttfb_fresh")], "<=1.2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="~30 MB instead of --mb")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    mb = 30 if args.quick else args.mb
    rows_per_shard = 4096 if args.quick else 16384           # ~4 MB / ~17 MB shards
    rows = max(1, -(-mb * 10**6 // (DIM * 4 + 16) // rows_per_shard)) * rows_per_shard  # >= --mb MB

    tmp = tempfile.mkdtemp(prefix="sy-bench-")
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "SHIPYARD_S3_ENDPOINT": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray = None
    try:
        import boto3
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=env["SHIPYARD_S3_ENDPOINT"]).create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.1)
        local, pqdir = os.path.join(tmp, "shards"), os.path.join(tmp, "parquet")
        os.makedirs(pqdir)
        make_dataset(local, rows, rows_per_shard, pqdir)
        s3uri = f"s3://{BUCKET}/ds"
        fs, _ = storage.filesystem(s3uri)
        for name in sorted(os.listdir(local)):  # manifest.json sorts after shard-*: written last
            fs.put_file(os.path.join(local, name), f"{BUCKET}/ds/{name}")
        fs.put(pqdir + "/", f"{BUCKET}/ds-parquet/", recursive=True)
        m = read_manifest(local)
        bytes_per_row = m.bytes / m.rows
        emit(setup=True, rows=m.rows, shards=len(m.shards), mb=round(m.bytes / 1e6, 1), batch_size=BATCH,
             rows_per_shard=rows_per_shard, cpus=os.cpu_count())

        res: dict = {}
        bench_store("local", local, bytes_per_row, args.repeats, res)
        bench_store("s3", s3uri, bytes_per_row, args.repeats, res)

        import pyarrow.fs as pafs
        import ray
        # address="local": a private cluster in our temp dir, never someone else's running one.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.path.join(tmp, "ray"))
        ray.data.DataContext.get_current().enable_progress_bars = False
        s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1")
        for store, path, fs_ in (("local", pqdir, None), ("s3", f"{BUCKET}/ds-parquet", s3)):
            try:
                recorder(store, bytes_per_row, res)("ray_data", *best_of(args.repeats, ray_data, path, fs_),
                                                    fmt="parquet (uncompressed)")
            except Exception as e:  # a Ray failure (someone else's `ray stop`) must not lose the other lines
                emit(store=store, reader="ray_data", error=repr(e)[:300])
        for store in ("local", "s3"):
            ratios(store, res)
    finally:
        if ray is not None:
            ray.shutdown()
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
