"""Read throughput, time to first batch and peak memory of shipyard's ShardStream, against raw
pyarrow (the physical floor), MosaicML Streaming (the anchor) and Ray Data.

One synthetic dataset (``id`` int64, ``x`` fixed_size_list<float32>[256], ``y`` int64: ~1 KB/row;
``--mb`` MB, default 200; ``--quick`` ~30 MB) is written once with shipyard's own shard writer as
Arrow IPC shards, to local disk and to a moto S3 server on 127.0.0.1 (started here, stopped at the
end). The same rows are converted once, outside every timing, to uncompressed Parquet (one file
per shard, for Ray Data) and to MosaicML Streaming's MDS (``x`` as ``ndarray:float32:256``, shards
of about shipyard's shard size, no compression), and uploaded next to the shards.

Every measurement runs in a fresh child process (one per reader and store), so that each reader's
peak RSS is its own: ``peak_rss_mb`` is the child's ``VmHWM`` after the timed passes (not
``ru_maxrss``, which Linux carries over from the parent through fork and exec), ``base_rss_mb`` its
RSS after imports, before any data. Readers with helper processes add ``helpers_peak_rss_mb``:
shipyard world=2, the larger rank's ``VmHWM``; Streaming and Ray, the peak of the summed PSS of
every process under the child (its DataLoader workers; raylet, GCS and Ray workers), sampled every
0.2 s (PSS, because forked workers share the parent's pages). One JSON line per measurement:

- ``raw_pyarrow``: every shard read once, sequentially, no prefetch, no shuffle, no tensors
  (local: ``pa.OSFile`` + ``read_all``; S3: the s3fs filesystem shipyard uses, ``cat_file`` +
  ``read_all``): the floor for getting the bytes into Arrow. Local also gets ``raw_pyarrow_mmap``
  (zero-copy: it never touches the data, an upper bound no reader that delivers values can reach).
- ``shipyard``: ``ShardStream(uri, batch_size, rank, world, seed=0, shuffle=True)`` iterated to the
  end with its defaults (2 shards read ahead, 4 batches assembled ahead in a background thread),
  every batch a dict of tensors. world=2 runs both ranks concurrently in 2 spawned processes
  (warmed up with one batch, timed from a common barrier); rows/s is all rows over the slower rank.
- ``shipyard_noshuffle`` (attribution): world=1 with ``shuffle=False`` (batches are views).
- ``streaming``: ``StreamingDataset(shuffle=True, shuffle_seed=0, batch_size)`` through a
  ``StreamingDataLoader(batch_size, num_workers=--streaming-workers)`` (default 2, one per core);
  local: ``local=`` the MDS directory; S3: ``remote=s3://...``, a fresh empty cache per run.
  mosaicml-streaming 0.13 cannot share the project's environment (it needs numpy<2.2 and pulls
  torch 2.14 with CUDA; the project pins numpy 2.4 and torch 2.13 CPU), so it runs from a venv this
  bench creates under ``~/.cache/shipyard/bench-venvs/`` with the project's torch; the setup line
  says which. Its ``streaming.vision`` module is stubbed there: it imports torchvision, whose only
  reachable wheels are CUDA builds that do not load against CPU torch; nothing here uses it.
- ``ray_data``: ``ray.data.read_parquet(...).iter_torch_batches(batch_size)`` over the Parquet
  copy, file order (no shuffle: this favours Ray). ``ray.init(num_cpus=2)`` outside the timing.
- ``ttfb_fresh``: seconds from constructing the reader (manifest/index read included) to its first
  batch; ``ttfb_resume_90pct``: the same for a reader given the state of one that consumed 90% of
  its batches (shipyard: ``load_state_dict(state_dict())``; Streaming: its loader's
  ``state_dict()``/``load_state_dict``). Median of 5 (Streaming: of 3, each start forks workers).

rows/s count rows handed to the caller; MB/s is rows/s x the shards' average bytes per row, so all
readers are on one scale. Throughput is the fastest of ``--repeats`` (default 2) passes in the
child. Same data, warm page cache / same moto server for every reader; the machine has 2 cores and
other work may run on it (the setup line gives the load average): expect +-10% run to run. Ratio
lines at the end compare against the goals (shipyard >= 0.9x raw, >= 1.5x Streaming and Ray Data).

Run: python tests/bench/data_stream.py [--mb N] [--quick] [--repeats R] [--no-streaming] [--no-ray]
"""

# Only the standard library and NumPy at the top: the Streaming side runs this file from its own
# venv, which has neither shipyard nor its dependencies.
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

BATCH = 256
DIM = 256
BUCKET = "bench"
STREAMING_PIN = "mosaicml-streaming==0.13.*"
VENV = os.path.expanduser("~/.cache/shipyard/bench-venvs/streaming-0.13")
CHILD_TIMEOUT_S = 900


def emit(**kw) -> None:
    print(json.dumps({"bench": "data_stream", **kw}), flush=True)


def status_mb(field: str, pid: str = "self") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return round(next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024, 1)


class TreePss(threading.Thread):
    """The peak, over time, of the summed PSS of every process below this one."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb, self._stop_at = 0, threading.Event()

    @staticmethod
    def _below(pid: int) -> list[int]:
        out = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for k in kids:
                out += [k, *TreePss._below(k)]
        return out

    def run(self) -> None:
        while not self._stop_at.wait(0.2):
            total = 0
            for pid in self._below(os.getpid()):
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
                except (OSError, StopIteration):
                    continue
            self.peak_kb = max(self.peak_kb, total)

    def stop(self) -> float:
        self._stop_at.set()
        self.join()
        return round(self.peak_kb / 1024, 1)


def best_of(repeats: int, fn, *args) -> tuple[int, float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        runs.append(out if isinstance(out, tuple) else (out, time.perf_counter() - t0))
    return min(runs, key=lambda r: r[1])


# -- data -----------------------------------------------------------------------------------
def make_dataset(dest: str, rows: int, rows_per_shard: int, parquet_dir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shipyard.data.sources import Source
    from shipyard.data.writer import write_dataset

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


def import_streaming():
    """``streaming``, with ``streaming.vision`` stubbed (see the docstring)."""
    import types

    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def mds_convert(shards: str, out: str, size_limit: int) -> int:
    """The Arrow shards' rows, in order, as MDS (run in the Streaming venv)."""
    import pyarrow as pa

    MDSWriter = import_streaming().MDSWriter

    rows = 0
    columns = {"id": "int64", "x": f"ndarray:float32:{DIM}", "y": "int64"}
    with MDSWriter(out=out, columns=columns, compression=None, size_limit=size_limit) as w:
        for name in sorted(f for f in os.listdir(shards) if f.startswith("shard-")):
            t = pa.ipc.open_file(pa.OSFile(os.path.join(shards, name))).read_all()
            ids, ys = t["id"].to_numpy(), t["y"].to_numpy()
            xs = t["x"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
            for i in range(t.num_rows):
                w.write({"id": int(ids[i]), "x": xs[i], "y": int(ys[i])})
            rows += t.num_rows
    return rows


# -- readers (each runs inside a child process) ---------------------------------------------
def raw_pyarrow(uri: str, mmap: bool = False) -> int:
    import pyarrow as pa

    from shipyard import storage
    from shipyard.data import read_manifest

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
    from shipyard.data import ShardStream

    if barrier is not None:  # a fresh process: warm it up (imports, s3fs client, lazy init) first
        it = iter(ShardStream(uri, batch_size=BATCH, rank=rank, world=world, seed=0, shuffle=shuffle))
        next(it)
        it.close()
        barrier.wait()
    t0, rows = time.perf_counter(), 0
    for b in ShardStream(uri, batch_size=BATCH, rank=rank, world=world, seed=0, shuffle=shuffle):
        rows += len(b["id"])
    if q is not None:
        q.put((rows, time.perf_counter() - t0, status_mb("VmHWM")))
    return rows


def shipyard_world2(uri: str, hwm: list) -> tuple[int, float]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=shipyard_rank, args=(uri, r, 2, True, barrier, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    hwm.append(max(h for _, _, h in res))
    return sum(r for r, _, _ in res), max(s for _, s, _ in res)


def shipyard_ttfb(uri: str, state: dict | None, shuffle: bool = True) -> float:
    from shipyard.data import ShardStream

    t0 = time.perf_counter()
    s = ShardStream(uri, batch_size=BATCH, rank=0, world=1, seed=0, shuffle=shuffle)
    if state is not None:
        s.load_state_dict(state)
    it = iter(s)
    next(it)
    dt = time.perf_counter() - t0
    it.close()
    return dt


def shipyard_state_at_90(uri: str) -> dict:
    from shipyard.data import ShardStream

    s = ShardStream(uri, batch_size=BATCH, rank=0, world=1, seed=0, shuffle=True)
    it = iter(s)
    for _ in range(int(0.9 * s.batches_per_epoch)):
        next(it)
    state = s.state_dict()
    it.close()
    return state


def ray_data(path: str, filesystem) -> int:
    import ray

    rows = 0
    for b in ray.data.read_parquet(path, filesystem=filesystem).iter_torch_batches(batch_size=BATCH):
        rows += len(b["id"])
    return rows


class Streaming:
    """MosaicML Streaming over the MDS copy (run in the Streaming venv)."""

    def __init__(self, remote: str | None, local: str | None, workers: int, tmp: str):
        import_streaming()
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        self.remote, self.local, self.workers, self.tmp, self.n = remote, local, workers, tmp, 0

    def loader(self, state: dict | None = None):
        import gc

        from streaming import StreamingDataLoader, StreamingDataset

        gc.collect()  # the previous dataset's hold on its local directory goes with it
        self.n += 1
        local = self.local if self.remote is None else os.path.join(self.tmp, f"cache-{self.n}")
        ds = StreamingDataset(remote=self.remote, local=local, shuffle=True, shuffle_seed=0, batch_size=BATCH)
        loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=self.workers)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def one_pass(self) -> int:
        rows = 0
        for b in self.loader():
            rows += len(b["id"])
        return rows

    def ttfb(self, state: dict | None) -> float:
        t0 = time.perf_counter()
        it = iter(self.loader(state))
        next(it)
        dt = time.perf_counter() - t0
        del it
        return dt

    def state_at_90(self) -> dict:
        loader = self.loader()
        stop = int(0.9 * len(loader))
        it = iter(loader)
        for _ in range(stop):
            next(it)
        state = loader.state_dict()
        del it
        return state


def child(spec: dict) -> dict:
    """One measurement, in this (fresh) process."""
    reader, uri, repeats = spec["reader"], spec.get("uri"), spec.get("repeats", 2)
    if reader == "mds_convert":
        return {"rows": mds_convert(spec["shards"], spec["out"], spec["size_limit"])}
    if reader in ("raw_pyarrow", "shipyard"):  # imports and lazy set-up (s3fs client) before any clock
        import pyarrow  # noqa: F401
        import torch  # noqa: F401

        from shipyard.data import read_manifest

        read_manifest(uri)
    elif reader == "streaming":
        streaming = Streaming(spec.get("remote"), spec.get("local"), spec["workers"], spec["tmp"])
    elif reader == "ray_data":
        import pyarrow.fs as pafs
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.path.join(spec["tmp"], "ray"))
        ray.data.DataContext.get_current().enable_progress_bars = False
        fs = None
        if spec.get("port"):
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{spec['port']}", scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1")
    base = status_mb("VmRSS")
    out: dict = {}
    tree = TreePss() if reader in ("streaming", "ray_data") else None
    if tree is not None:
        tree.start()
    if reader == "raw_pyarrow":
        rows, secs = best_of(repeats, raw_pyarrow, uri, spec.get("mmap", False))
    elif reader == "shipyard":
        if spec.get("world", 1) == 2:
            hwm: list = []
            rows, secs = best_of(repeats, shipyard_world2, uri, hwm)
            out["helpers_peak_rss_mb"] = max(hwm)
        else:
            shipyard_ttfb(uri, None, spec.get("shuffle", True))  # warm-up: one batch
            rows, secs = best_of(repeats, shipyard_rank, uri, 0, 1, spec.get("shuffle", True))
        out["peak_rss_mb"] = status_mb("VmHWM")
        if spec.get("ttfb"):
            state = shipyard_state_at_90(uri)
            out["ttfb_fresh"] = statistics.median(shipyard_ttfb(uri, None) for _ in range(5))
            out["ttfb_resume"] = statistics.median(shipyard_ttfb(uri, state) for _ in range(5))
            out["resume_consumed"] = state["consumed"]
    elif reader == "streaming":
        s = streaming
        rows, secs = best_of(repeats, s.one_pass)
        out["peak_rss_mb"], out["helpers_peak_rss_mb"] = status_mb("VmHWM"), tree.stop()
        state = s.state_at_90()
        out["ttfb_fresh"] = statistics.median(s.ttfb(None) for _ in range(3))
        out["ttfb_resume"] = statistics.median(s.ttfb(state) for _ in range(3))
        out["resume_consumed"] = state.get("sample_in_epoch")
    elif reader == "ray_data":  # peak RSS: this driver only (Ray's workers and object store are apart)
        try:
            rows, secs = best_of(repeats, ray_data, spec["path"], fs)
        finally:
            ray.shutdown()
    else:
        raise ValueError(f"unknown reader {reader!r}")
    out.setdefault("peak_rss_mb", status_mb("VmHWM"))
    if tree is not None and "helpers_peak_rss_mb" not in out:
        out["helpers_peak_rss_mb"] = tree.stop()
    return {"rows": rows, "seconds": secs, "base_rss_mb": base, **out}


# -- the parent -----------------------------------------------------------------------------
def run_child(python: str, spec: dict) -> dict:
    """Run :func:`child` in a fresh ``python``; its result, or ``{"error": ...}``."""
    try:
        p = subprocess.run([python, os.path.abspath(__file__), "--child", json.dumps(spec)], capture_output=True,
                           text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"child"')]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-600:]}
    return json.loads(lines[-1])["child"]


def streaming_python() -> tuple[str | None, str]:
    """A Python with mosaicml-streaming 0.13: this one if it has it, else the bench's own venv
    (created on first use, with the project's torch so nothing CUDA is pulled in)."""
    probe = ("import sys, types; sys.modules['streaming.vision'] = types.ModuleType('streaming.vision'); "
             "import streaming; print(streaming.__version__)")

    def version(py: str) -> str | None:
        try:
            p = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout.strip() if p.returncode == 0 and p.stdout.strip().startswith("0.13") else None

    if v := version(sys.executable):
        return sys.executable, f"mosaicml-streaming {v} in the project's environment"
    py = os.path.join(VENV, "bin", "python")
    if not version(py):
        from importlib.metadata import version as dist_version

        emit(setup="streaming", creating_venv=VENV, note="one-time: installs torch (CPU) and mosaicml-streaming")
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, timeout=300)
        p = subprocess.run([py, "-m", "pip", "install", "-q", f"torch=={dist_version('torch')}", STREAMING_PIN,
                            "pyarrow", "numpy"], capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            return None, f"could not create {VENV}: {p.stderr[-400:]}"
    if v := version(py):
        return py, (f"mosaicml-streaming {v} in a separate venv ({VENV}): it needs numpy<2.2 and would replace "
                    f"the project's torch; streaming.vision stubbed (torchvision does not load against CPU torch)")
    return None, f"{VENV} has no working mosaicml-streaming 0.13"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Results:
    def __init__(self, bytes_per_row: float):
        self.bytes_per_row, self.rate, self.ttfb = bytes_per_row, {}, {}

    def record(self, store: str, reader: str, r: dict, **extra) -> None:
        if "error" in r:
            emit(store=store, reader=reader, **extra, error=r["error"])
            return
        rate = r["rows"] / r["seconds"]
        self.rate[(store, reader, extra.get("world", 1))] = rate
        emit(store=store, reader=reader, **extra, rows=r["rows"], seconds=round(r["seconds"], 3),
             rows_per_s=round(rate), mb_per_s=round(rate * self.bytes_per_row / 1e6, 1),
             peak_rss_mb=r["peak_rss_mb"], base_rss_mb=r["base_rss_mb"],
             **({"helpers_peak_rss_mb": r["helpers_peak_rss_mb"]} if "helpers_peak_rss_mb" in r else {}))
        if "ttfb_fresh" in r:
            self.ttfb[(store, reader)] = (r["ttfb_fresh"], r["ttfb_resume"])
            emit(store=store, reader=reader, metric="ttfb_fresh", seconds=round(r["ttfb_fresh"], 4))
            emit(store=store, reader=reader, metric="ttfb_resume_90pct", seconds=round(r["ttfb_resume"], 4),
                 consumed=r["resume_consumed"])

    def ratios(self, store: str) -> None:
        def ratio(name: str, num, den, goal: str) -> None:
            value = None if num is None or den is None else num / den
            ok = None if value is None else (value >= float(goal[2:]) if goal[0] == ">" else value <= float(goal[2:]))
            emit(store=store, ratio=name, value=None if value is None else round(value, 3), goal=goal, met=ok)

        rate = lambda reader: self.rate.get((store, reader, 1))  # noqa: E731
        sy = rate("shipyard")
        ratio("shipyard_w1/raw_pyarrow", sy, rate("raw_pyarrow"), ">=0.9")
        if store == "local":
            ratio("shipyard_w1/raw_pyarrow_mmap", sy, rate("raw_pyarrow_mmap"), ">=0.9")
        ratio("shipyard_w1/streaming", sy, rate("streaming"), ">=1.5")
        ratio("shipyard_w1/ray_data", sy, rate("ray_data"), ">=1.5")
        mine, theirs = self.ttfb.get((store, "shipyard")), self.ttfb.get((store, "streaming"))
        if mine:
            ratio("resume_ttfb/fresh_ttfb", mine[1], mine[0], "<=1.2")
        if mine and theirs:
            ratio("streaming_ttfb_fresh/shipyard_ttfb_fresh", theirs[0], mine[0], ">=1.5")
            ratio("streaming_ttfb_resume/shipyard_ttfb_resume", theirs[1], mine[1], ">=1.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="~30 MB instead of --mb")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streaming-workers", type=int, default=2)
    ap.add_argument("--no-streaming", action="store_true")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"child": child(json.loads(args.child))}), flush=True)
        return

    from shipyard import storage
    from shipyard.data import ShardStream, read_manifest

    mb = 30 if args.quick else args.mb
    rows_per_shard = 4096 if args.quick else 16384           # ~4 MB / ~17 MB shards
    rows = max(1, -(-mb * 10**6 // (DIM * 4 + 16) // rows_per_shard)) * rows_per_shard  # >= --mb MB

    tmp = tempfile.mkdtemp(prefix="sy-bench-")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "SHIPYARD_S3_ENDPOINT": endpoint, "S3_ENDPOINT_URL": endpoint}  # the latter: Streaming's boto3
    os.environ.update(env)
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.1)
        local, pqdir, mdsdir = (os.path.join(tmp, d) for d in ("shards", "parquet", "mds"))
        os.makedirs(pqdir)
        make_dataset(local, rows, rows_per_shard, pqdir)
        s3uri = f"s3://{BUCKET}/ds"
        fs, _ = storage.filesystem(s3uri)
        for name in sorted(os.listdir(local)):  # manifest.json sorts after shard-*: written last
            fs.put_file(os.path.join(local, name), f"{BUCKET}/ds/{name}")
        fs.put(pqdir + "/", f"{BUCKET}/ds-parquet/", recursive=True)
        m = read_manifest(local)
        bytes_per_row, shard_bytes = m.bytes / m.rows, m.bytes / len(m.shards)
        probe = ShardStream(local, batch_size=BATCH)
        bound = (probe.prefetch + 2) * shard_bytes + (probe.ready_batches + 1) * BATCH * bytes_per_row
        emit(setup=True, rows=m.rows, shards=len(m.shards), mb=round(m.bytes / 1e6, 1), batch_size=BATCH,
             rows_per_shard=rows_per_shard, cpus=os.cpu_count(), load_avg=[round(x, 2) for x in os.getloadavg()],
             shipyard_prefetch=probe.prefetch, shipyard_ready_batches=probe.ready_batches,
             shipyard_memory_bound_mb=round(bound / 1e6, 1),
             memory_bound="(prefetch + 2) shards + (ready_batches + 1) batches, plus what the caller keeps")

        spy, note = (None, "--no-streaming") if args.no_streaming else streaming_python()
        if spy:
            r = run_child(spy, {"reader": "mds_convert", "shards": local, "out": mdsdir, "size_limit": int(shard_bytes)})
            if "error" in r:
                spy, note = None, f"MDS conversion failed: {r['error']}"
            else:
                fs.put(mdsdir + "/", f"{BUCKET}/mds/", recursive=True)
        emit(setup="streaming", python=spy, note=note, workers=args.streaming_workers)

        res = Results(bytes_per_row)
        py = sys.executable
        common = {"repeats": args.repeats, "tmp": tmp}
        for store, uri in (("local", local), ("s3", s3uri)):
            res.record(store, "raw_pyarrow", run_child(py, {**common, "reader": "raw_pyarrow", "uri": uri}))
            if store == "local":
                res.record(store, "raw_pyarrow_mmap", run_child(py, {**common, "reader": "raw_pyarrow", "uri": uri,
                                                                     "mmap": True}))
            res.record(store, "shipyard", run_child(py, {**common, "reader": "shipyard", "uri": uri, "ttfb": True}),
                       world=1)
            res.record(store, "shipyard_noshuffle", run_child(py, {**common, "reader": "shipyard", "uri": uri,
                                                                   "shuffle": False}), world=1)
            res.record(store, "shipyard", run_child(py, {**common, "reader": "shipyard", "uri": uri, "world": 2}),
                       world=2, workers="2 processes")
            if spy:
                where = {"local": mdsdir} if store == "local" else {"remote": f"s3://{BUCKET}/mds"}
                res.record(store, "streaming", run_child(spy, {**common, "reader": "streaming", **where,
                                                               "workers": args.streaming_workers}),
                           fmt="mds (uncompressed)", workers=args.streaming_workers)
            if not args.no_ray:
                path = pqdir if store == "local" else f"{BUCKET}/ds-parquet"
                res.record(store, "ray_data", run_child(py, {**common, "reader": "ray_data", "path": path,
                                                             "port": port if store == "s3" else None}),
                           fmt="parquet (uncompressed)")
        for store in ("local", "s3"):
            res.ratios(store)
        emit(done=True, load_avg=[round(x, 2) for x in os.getloadavg()])
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
