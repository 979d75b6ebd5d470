"""DCP checkpoints with real gloo ranks against the moto S3 server: what is saved comes back,
an upload killed half-way harms nothing, and a checkpoint loads at another world size.

Each phase runs in fresh processes (torch.multiprocessing), like a restarted job would.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from shipyard.checkpoint import CheckpointStore
from shipyard.checkpoint import dcp as ckpt
from shipyard.checkpoint.saver import Checkpointer
from shipyard.errors import CheckpointError

pytestmark = pytest.mark.integration


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _train(model, opt, steps):
    width = next(model.parameters()).shape[1]  # the first Linear's inputs
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, width)).sum().backward()
        opt.step()


def _data_state(rank, world, step):
    return {"epoch": 1, "consumed": 32 * step + rank, "world": world, "seed": 0, "rank": rank}


def _wide_model():
    """Three 8 MiB weights (and 16 MiB of AdamW state each): files above a 5 MiB part size."""
    return torch.nn.Sequential(torch.nn.Linear(2048, 1024), torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))


def _phase(rank, world, port, phase, uri, out_dir, part_bytes=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank if phase != "save" else rank)
        if part_bytes is not None:
            ckpt.WRITE_PART_BYTES = part_bytes
        model = torch.nn.parallel.DistributedDataParallel(_model() if part_bytes is None else _wide_model())
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        store = CheckpointStore(uri)
        saver = Checkpointer(store, strategy="ddp", keep_last=None, async_upload=True)
        result = {}
        if phase == "save":
            _train(model, opt, 3)
            result["blocked"] = saver.save(step=3, epoch=1, model=model, optimizer=opt,
                                           data_state=_data_state(rank, world, 3))
            # Training goes on while the upload runs; these updates must not leak into the checkpoint.
            saved = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
            saved_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
            result["rand"] = torch.rand(3)
            _train(model, opt, 2)
            saver.close()
            result["params"], result["exp_avg"] = saved, saved_avg
        else:
            rank_state = ckpt.restore(store, store.latest(), model=model, optimizer=opt)
            if rank_state is not None:
                ckpt.set_rng_state(rank_state["rng"])
            result.update(rank_state=rank_state, rand=torch.rand(3))
            result["params"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
            result["exp_avg"] = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
            if phase == "crash":
                _train(model, opt, 3)
                saver.save(step=6, epoch=1, model=model, optimizer=opt, data_state=_data_state(rank, world, 6))
                if rank == 1:  # dies once its upload has begun: a SIGKILL'd worker mid-upload
                    mine = f"{store.path_for(6)}/{ckpt.rank_file(1)}"
                    deadline = time.monotonic() + 30
                    while not store.fs.exists(mine) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    os._exit(1)
                saver.close()  # rank 0: its upload cannot complete without rank 1
            elif phase == "resave":
                _train(model, opt, 3)
                saver.save(step=6, epoch=1, model=model, optimizer=opt, data_state=_data_state(rank, world, 6))
                saver.close()
        torch.save(result, os.path.join(out_dir, f"{phase}-{world}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_phase(world, phase, uri, out_dir, part_bytes=None):
    mp.spawn(_phase, args=(world, free_port(), phase, uri, str(out_dir), part_bytes), nprocs=world, join=True)
    return [torch.load(out_dir / f"{phase}-{world}-{r}.pt", weights_only=False) for r in range(world)]


def assert_same_model(loaded, saved):
    for k, v in saved["params"].items():
        torch.testing.assert_close(loaded["params"][k], v, rtol=0, atol=0)
    for a, b in zip(loaded["exp_avg"], saved["exp_avg"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_async_round_trip_two_ranks_then_reshard_to_one(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    saved = run_phase(2, "save", uri, tmp_path)
    record = CheckpointStore(uri).latest()
    assert record.step == 3 and record.world == 2 and [d["consumed"] for d in record.data] == [96, 97]
    assert {f"rank-0000{r}.pt" for r in range(2)} | {".metadata"} <= set(record.files)

    loaded = run_phase(2, "load", uri, tmp_path)
    for rank in range(2):
        assert_same_model(loaded[rank], saved[0])  # the state at save(), not the later updates
        assert loaded[rank]["rank_state"]["data"]["consumed"] == 96 + rank
        # RNG restored per rank: the draws continue exactly where the saved run's did.
        torch.testing.assert_close(loaded[rank]["rand"], saved[rank]["rand"], rtol=0, atol=0)

    resharded = run_phase(1, "load", uri, tmp_path)[0]
    assert_same_model(resharded, saved[0])


def test_one_rank_checkpoint_loads_on_two(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    saved = run_phase(1, "save", uri, tmp_path)[0]
    loaded = run_phase(2, "load", uri, tmp_path)
    for rank in range(2):
        assert_same_model(loaded[rank], saved)
    assert loaded[1]["rank_state"] is None  # no rank 1 in the saved job: nothing per-rank to restore


def test_rank_killed_mid_upload_leaves_the_previous_checkpoint(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    store = CheckpointStore(uri)
    saved = run_phase(2, "save", uri, tmp_path)
    with pytest.raises(Exception):  # rank 1 exits with status 1 half-way through the upload
        run_phase(2, "crash", uri, tmp_path)
    listed = {c.step: c.committed for c in store.list()}
    assert listed == {3: True, 6: False}, listed  # files of step 6 were written, never committed
    assert store.latest().step == 3

    resumed = run_phase(2, "resave", uri, tmp_path)
    for rank in range(2):
        assert_same_model(resumed[rank], saved[0])  # came back from step 3
    assert store.latest().step == 6 and {c.step for c in store.list()} == {3, 6}


def test_incompatible_model_is_a_clear_error(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    run_phase(1, "save", uri, tmp_path)
    store = CheckpointStore(uri)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        other = torch.nn.Linear(8, 3)
        with pytest.raises(CheckpointError, match=f"{uri}/step-000000003: cannot load into this model"):
            ckpt.restore(store, store.latest(), model=other, optimizer=torch.optim.AdamW(other.parameters()))
    finally:
        dist.destroy_process_group()


def test_export_writes_one_plain_state_dict(bucket, s3_endpoint, tmp_path, shipyard):
    uri = f"s3://{bucket}/ck"
    saved = run_phase(2, "save", uri, tmp_path)[0]
    out = tmp_path / "model.pt"
    r = shipyard("checkpoints", "export", uri, str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"step 3 (epoch 1, saved by 2 ranks) -> {out}" in r.stdout
    exported = torch.load(out, weights_only=True)
    assert exported["step"] == 3 and exported["epoch"] == 1
    plain = _model()
    plain.load_state_dict(exported["model"])  # loads into a model that never saw shipyard
    for k, v in saved["params"].items():
        torch.testing.assert_close(plain.state_dict()[k], v, rtol=0, atol=0)

    r = shipyard("checkpoints", "export", uri, str(tmp_path / "m.pt"), "--step", "7")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {uri}: no committed checkpoint at step 7 (committed steps: 3)"
    assert not (tmp_path / "m.pt").exists()


def test_optimizer_step_waits_for_the_background_copy(tmp_path):
    """The optimizer state is copied while the next forward/backward runs; an optimizer.step
    that comes before the copy is done must wait, or the checkpoint would hold the new state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        _train(model, opt, 2)
        saved_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
        committed = []
        saver = Checkpointer(CheckpointStore(str(tmp_path / "ck")), strategy="ddp", keep_last=None,
                             on_commit=committed.append)
        stage = saver._background_stager._stage
        saver._background_stager._stage = lambda *a, **kw: (time.sleep(1.0), stage(*a, **kw))[1]  # a slow copy
        saver.save(step=2, epoch=0, model=model, optimizer=opt, data_state={})
        _train(model, opt, 1)  # steps at once, while the copy is still running
        saver.close()
        assert committed[0].blocked_s >= 0.9  # the wait in optimizer.step counts as blocked time

        fresh = _model()
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
        _train(fresh, fresh_opt, 1)  # creates the optimizer state that the load fills in
        ckpt.restore(saver.store, saver.store.latest(), model=fresh, optimizer=fresh_opt)
        for p, expected in zip(fresh.parameters(), saved_avg):
            torch.testing.assert_close(fresh_opt.state[p]["exp_avg"], expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_files_go_up_at_once_large_ones_in_parts_and_load_bit_exactly(bucket, s3_endpoint, tmp_path):
    """The writer uploads every file of a rank concurrently, files above the part size as
    multipart uploads; what DCP's stock reader loads back is bit-exact, on 2 ranks and on 1."""
    uri = f"s3://{bucket}/ck"
    part = 5 * 2**20  # S3's smallest part
    saved = run_phase(2, "save", uri, tmp_path, part_bytes=part)
    store = CheckpointStore(uri)
    record = store.latest()
    distcp = {f: n for f, n in record.files.items() if f.endswith(".distcp")}
    assert len(distcp) == 2 * ckpt.WRITE_FILES
    large = [f for f, n in distcp.items() if n > part]
    assert large, distcp
    for f in large:  # a multipart object's ETag ends in -<number of parts>
        etag = store.fs.info(f"{store.path_for(3)}/{f}")["ETag"].strip('"')
        assert etag.endswith(f"-{-(-distcp[f] // part)}"), (f, distcp[f], etag)

    loaded = run_phase(2, "load", uri, tmp_path, part_bytes=part)
    for rank in range(2):
        assert_same_model(loaded[rank], saved[0])
    assert_same_model(run_phase(1, "load", uri, tmp_path, part_bytes=part)[0], saved[0])
