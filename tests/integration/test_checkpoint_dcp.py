"""DCP checkpoints with 2 real gloo ranks against the moto S3 server: what is saved comes back.

Each phase runs in fresh processes (torch.multiprocessing), like a restarted job would.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from shipyard.checkpoint import CheckpointStore
from shipyard.checkpoint import dcp as ckpt

pytestmark = pytest.mark.integration


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _phase(rank, world, port, phase, uri, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank if phase != "save" else rank)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        store = CheckpointStore(uri)
        if phase == "save":
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
            ckpt.save(store, step=3, epoch=1, model=model, optimizer=opt,
                      data_state={"epoch": 1, "consumed": 96 + rank, "world": world, "seed": 0, "rank": rank},
                      strategy="ddp", keep_last=None)
            result = {"rand": torch.rand(3)}
        else:
            rank_state = ckpt.restore(store, store.latest(), model=model, optimizer=opt)
            if rank_state is not None:
                ckpt.set_rng_state(rank_state["rng"])
            result = {"rank_state": rank_state, "rand": torch.rand(3)}
        result["params"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        result["exp_avg"] = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
        torch.save(result, os.path.join(out_dir, f"{phase}-{world}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_phase(world, phase, uri, out_dir):
    mp.spawn(_phase, args=(world, free_port(), phase, uri, str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"{phase}-{world}-{r}.pt", weights_only=False) for r in range(world)]


def test_round_trip_two_ranks_then_reshard_to_one(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    saved = run_phase(2, "save", uri, tmp_path)
    record = CheckpointStore(uri).latest()
    assert record.step == 3 and record.world == 2 and [d["consumed"] for d in record.data] == [96, 97]

    loaded = run_phase(2, "load", uri, tmp_path)
    for rank in range(2):
        for k, v in saved[0]["params"].items():
            torch.testing.assert_close(loaded[rank]["params"][k], v, rtol=0, atol=0)
        for a, b in zip(loaded[rank]["exp_avg"], saved[0]["exp_avg"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert loaded[rank]["rank_state"]["data"]["consumed"] == 96 + rank
        # RNG restored per rank: the draws continue exactly where the saved run's did.
        torch.testing.assert_close(loaded[rank]["rand"], saved[rank]["rand"], rtol=0, atol=0)

    resharded = run_phase(1, "load", uri, tmp_path)[0]
    for k, v in saved[0]["params"].items():
        torch.testing.assert_close(resharded["params"][k], v, rtol=0, atol=0)


def test_incompatible_model_is_a_clear_error(bucket, s3_endpoint, tmp_path):
    uri = f"s3://{bucket}/ck"
    run_phase(1, "save", uri, tmp_path)
    store = CheckpointStore(uri)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        other = torch.nn.Linear(8, 3)
        from shipyard.errors import CheckpointError
        with pytest.raises(CheckpointError, match=f"{uri}/step-000000003: cannot load into this model"):
            ckpt.restore(store, store.latest(), model=other, optimizer=torch.optim.AdamW(other.parameters()))
    finally:
        dist.destroy_process_group()
