"""How long a checkpoint blocks training, synchronous vs asynchronous, and how fast it uploads.

A ~100M-parameter MLP (``--layers`` x Linear(2048, 2048)) with AdamW state (exp_avg, exp_avg_sq:
about 1.2 GB of fp32 in all) is checkpointed by shipyard's Checkpointer from one gloo rank, to
local disk and to a moto S3 server on 127.0.0.1 (started here, stopped at the end), in one run.
For each store:

- ``sync``: ``async_upload=False``; blocked = the whole save (DCP write + commit + prune).
- ``async``: ``async_upload=True``; blocked = the time inside ``save()`` (wait for the previous
  upload, copy of what the optimizer does not step to CPU memory) plus the time the next
  ``optimizer.step`` waited for the copy of the parameters and the optimizer state, which runs
  during the forward and backward. Training steps
  (forward, backward and AdamW step on a batch of 16) run while the upload is in flight, and
  the next save comes only after it committed, as in a job whose checkpoint interval is longer
  than an upload. ``upload_s`` is save() to COMMIT.json.
- ``plain_put``: the same files (the newest local checkpoint), after each synchronous save (so
  both see the same load from whatever else runs on the machine), uploaded with one s3fs
  ``put(recursive=True)`` -- or, for local disk, copied with ``LocalFileSystem.put`` then
  ``os.sync()`` (DCP fsyncs its files) -- the throughput any uploader of those bytes gets,
  without DCP, staging or a commit protocol. s3fs's ``put_file`` reads each file whole and sends
  it in one PUT when it is under 100 MiB (2 x its 50 MiB chunk; multipart above), all files at
  once, so at most botocore's connection pool (``connections``, 10 by default) in flight: the
  checkpoint writer has the same rules (one PUT per file up to 128 MiB, as many requests in
  flight as the pool has connections), so the two differ only in what happens on the client.

Upload throughput is compared on the ``sync`` save (the same write as ``async``, with nothing
else running); ``async`` also reports its upload time while training competes for the CPUs.
Upload time runs from ``save()`` to ``COMMIT.json``; deleting the previous checkpoint after it
(retention) is not counted there, but it is in the synchronous save's blocked time.

Each mode saves ``--saves`` times (default 3, ``keep_last=1``, so retention runs too); the median
is reported. The last lines are ratios: async blocked / sync blocked (goal <= 0.05) and upload
throughput / plain put (goal >= 0.8).

On a GPU (``--device cuda``) the model and its optimizer state live on the device and the rank's
default process group is NCCL, as in a job with ``workers.gpus``: the copy to CPU memory is then a
device-to-host copy into pinned buffers (tests/gpu/proof.py runs it with ``--stores local``).

Run: python tests/bench/checkpoint.py [--layers N] [--saves K] [--quick] [--device cpu|cuda] [--stores local,s3]
"""

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
import time

import torch
import torch.distributed as dist


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_job(layers: int, device: torch.device = torch.device("cpu")):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, opt)  # creates the optimizer state
    return model, opt


def train_step(model, opt) -> None:
    """Forward, backward and an AdamW step on a small batch: touches every parameter and state tensor."""
    opt.zero_grad(set_to_none=True)
    model(torch.randn(16, 2048, device=next(model.parameters()).device)).square().mean().backward()
    opt.step()


def run_mode(uri: str, model, opt, *, async_upload: bool, saves: int, between=None) -> dict:
    from shipyard.checkpoint import CheckpointStore
    from shipyard.checkpoint.saver import Checkpointer

    store = CheckpointStore(uri)
    committed = []
    saver = Checkpointer(store, strategy="ddp", keep_last=1, async_upload=async_upload, on_commit=committed.append)
    steps_during_upload = []
    for i in range(1, saves + 1):
        saver.save(step=i, epoch=0, model=model, optimizer=opt, data_state={"step": i})
        n = 0
        while len(committed) < i:  # training goes on while the upload is in flight
            train_step(model, opt)
            n += 1
        steps_during_upload.append(n)
        if between is not None:
            between()
    saver.close()
    blocked = [s.blocked_s for s in committed]
    nbytes = committed[-1].record.bytes
    upload = [s.total_s for s in committed]
    return {"blocked_s": statistics.median(blocked), "upload_s": statistics.median(upload),
            "MB": round(nbytes / 1e6, 1), "MB_per_s": round(nbytes / 1e6 / statistics.median(upload), 1),
            "steps_during_upload": steps_during_upload, "blocked_all": [round(b, 3) for b in blocked],
            "upload_all": [round(u, 3) for u in upload]}


class PlainPut:
    """Uploads of a checkpoint's files with a plain ``put``, one after each synchronous save.

    Alternating the two puts both under the same load from whatever else shares the machine.
    """

    def __init__(self, src_root: str, dest_uri: str):
        from shipyard import storage

        self.src_root = src_root
        self.fs, self.path = storage.filesystem(dest_uri)
        self.times: list[float] = []
        self.sizes: list[int] = []

    def __call__(self) -> None:
        src = os.path.join(self.src_root, max(d for d in os.listdir(self.src_root) if d.startswith("step-")))
        self.sizes = [os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(src) for f in names]
        target = f"{self.path}/put-{len(self.times)}"
        t0 = time.monotonic()
        self.fs.put(src, target, recursive=True)
        if target.startswith("/"):
            os.sync()  # DCP fsyncs what it writes to local disk: make the copy as durable
        self.times.append(time.monotonic() - t0)
        self.fs.rm(target, recursive=True)

    def result(self) -> dict:
        t, nbytes = statistics.median(self.times), sum(self.sizes)
        how = {"files": len(self.sizes), "largest_MB": round(max(self.sizes) / 1e6, 1)}
        if hasattr(self.fs, "s3"):
            how["connections"] = self.fs.s3.meta.config.max_pool_connections
        return {"upload_s": t, "MB": round(nbytes / 1e6, 1), "MB_per_s": round(nbytes / 1e6 / t, 1),
                "upload_all": [round(x, 3) for x in self.times], **how}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="Linear(2048, 2048) layers; 24 is ~100.7M parameters")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers, 2 saves: a smoke run")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model and optimizer state live (cuda: NCCL default group, as in a GPU job)")
    ap.add_argument("--stores", default="local,s3", help="comma-separated: local (a temp dir), s3 (a moto server)")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"local", "s3"}:
        ap.error(f"--stores: got {args.stores!r}; expected local, s3 or both, comma-separated")
    if args.quick:
        args.layers, args.saves = 4, 2

    torch.set_num_threads(2)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    moto = None
    tmp = tempfile.mkdtemp(prefix="shipyard-bench-ckpt-")
    try:
        if "s3" in stores:
            moto, endpoint = start_moto()
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1", SHIPYARD_S3_ENDPOINT=endpoint)
            import boto3
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

        model, opt = make_job(args.layers, device)
        params = sum(p.numel() for p in model.parameters())
        emit(bench="checkpoint", params=params, layers=args.layers, saves=args.saves,
             torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
             state_GB=round(sum(p.numel() * p.element_size() * 3 for p in model.parameters()) / 1e9, 3),
             gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        results = {}
        bases = {"local": os.path.join(tmp, "ck"), "s3": "s3://bench/ck"}
        for store, base in ((s, bases[s]) for s in stores):
            # The newest local synchronous checkpoint is the set of files a plain upload moves.
            put = PlainPut(os.path.join(tmp, "ck-sync"), os.path.join(tmp, "plain") if store == "local"
                           else "s3://bench/plain")
            for mode in ("sync", "async"):
                r = run_mode(f"{base}-{mode}", model, opt, async_upload=mode == "async", saves=args.saves,
                             between=put if mode == "sync" else None)
                results[store, mode] = r
                emit(store=store, mode=mode, **r)
            results[store, "plain_put"] = r = put.result()
            emit(store=store, mode="plain_put", **r)
        for store in stores:
            sync, asyn, put = results[store, "sync"], results[store, "async"], results[store, "plain_put"]
            emit(ratio="async_blocked/sync_blocked", store=store, value=round(asyn["blocked_s"] / sync["blocked_s"], 4),
                 goal="<= 0.05")
            pairs = [p / u for p, u in zip(put["upload_all"], sync["upload_all"])]  # save i, then put i
            emit(ratio="upload_MBps/plain_put_MBps", store=store, value=round(sync["MB_per_s"] / put["MB_per_s"], 3),
                 each_pair=[round(x, 3) for x in pairs], goal=">= 0.8")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
