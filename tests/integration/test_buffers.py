"""BatchNorm buffers across data-parallel ranks (parallel/buffers.py), on real 2-process gloo
groups (torch.multiprocessing: a Ray cluster adds nothing here).

Without a sync, two DDP ranks that read different rows end a step with different running
statistics (the last update is rank-local); ``sync_buffers`` makes them rank 0's, bit for bit.
The jobs/cnn ResNet then trains under ddp and fsdp through ``TrainContext``: its losses match a
single-process emulation of the data-parallel step, and both ranks end (after the final
checkpoint and the evaluation) with the same weights and buffers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, job_module

pytestmark = pytest.mark.integration
_model = job_module("cnn")
ResNet = _model.ResNet

CNN = {"width": 8, "blocks": 2, "lr": 0.003}
BATCH = 16  # rows per rank
LOSS_ATOL = 1e-4  # see test_parallel.py: fp32 reduction order only; a wrong rank moves it by 1e-2


def _buffers_rank(rank, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from shipyard.parallel.buffers import sync_buffers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(ResNet(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
        for _ in range(3):
            loss = model(torch.rand(BATCH, 64, generator=data)).logsumexp(1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        synced = sync_buffers(model)
        after = {k: v.clone() for k, v in model.module.state_dict().items()}
        torch.save({"before": before, "after": after, "synced": synced}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_buffers_makes_ranks_buffers_rank_zeros(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_buffers_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    stats = [k for k in r0["before"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 6 and r0["synced"] == r1["synced"] == 9  # 3 BatchNorms x mean, var, count
    # Different rows, so the rank-local last update differs...
    assert all(not torch.equal(r0["before"][k], r1["before"][k]) for k in stats)
    # ...and after the sync every buffer is rank 0's, bit for bit; rank 0 itself is unchanged.
    for k in r0["before"]:
        assert torch.equal(r1["after"][k], r0["before"][k]), k
        assert torch.equal(r0["after"][k], r0["before"][k]), k
    # Parameters were equal already (DDP averages gradients): the sync touches buffers only.
    weights = [k for k in r0["before"] if k.endswith("weight")]
    assert all(torch.equal(r0["before"][k], r1["before"][k]) for k in weights)


def _mesh_rank(rank, port, out):
    import torch.distributed as dist

    from shipyard.parallel.buffers import dp_group, sync_buffers
    from shipyard.parallel.mesh import ParallelDims

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        model = torch.nn.BatchNorm1d(3)
        model.running_mean.fill_(rank)
        sync_buffers(model, dp_group(ParallelDims(4, dp=2, tp=2)))
        torch.save(model.running_mean.clone(), Path(out) / f"mesh{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_is_over_the_data_parallel_group_only(tmp_path):
    """dp 2 x tp 2 (ranks 0,1 are dp rank 0; 2,3 dp rank 1): each rank gets the buffers of the
    dp-rank-0 peer with its tp index, not global rank 0's."""
    import torch.multiprocessing as mp

    mp.spawn(_mesh_rank, args=(free_port(), str(tmp_path)), nprocs=4)
    got = [torch.load(tmp_path / f"mesh{r}.pt")[0].item() for r in range(4)]
    assert got == [0.0, 1.0, 0.0, 1.0]


# -- jobs/cnn through TrainContext ---------------------------------------------------------

def _cnn_rank(rank, port, strategy, data, eval_data, out, ckpt):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        import train
        from shipyard.runtime.context import TrainContext
        from shipyard.spec import spec_from_dict

        spec = spec_from_dict({
            "name": "cnn", "entrypoint": "train.py:train", "workers": {"count": 2}, "strategy": {"kind": strategy},
            "dataset": {"uri": data, "eval_uri": eval_data, "batch_size": BATCH, "epochs": 1},
            "checkpoint": {"uri": ckpt, "every_steps": 7, "keep_last": None},
            "config": {**CNN, "out": out}})
        ctx = TrainContext(spec, rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        train.train(ctx)
        ctx.close()
    finally:
        dist.destroy_process_group()


def reference_losses(data: Path, steps: int) -> list[float]:
    """One process: each step, the mean of the two ranks' losses, each rank's batch normalised by
    its own statistics (what BatchNorm does under DDP and FSDP), one optimizer step on the mean."""
    from shipyard.data import ShardStream

    torch.manual_seed(0)
    model = ResNet(CNN["width"], CNN["blocks"])
    opt = torch.optim.AdamW(model.parameters(), lr=CNN["lr"], weight_decay=1e-4)
    streams = [ShardStream(str(data), batch_size=BATCH, rank=r, world=2, epochs=1) for r in range(2)]
    losses = []
    for parts in zip(*streams):
        per_rank = [torch.nn.functional.cross_entropy(model(p["x"]), p["y"]) for p in parts]
        torch.stack(per_rank).mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(sum(loss.item() for loss in per_rank) / 2)
        if len(losses) == steps:
            break
    return losses


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cnn_matches_reference_and_ranks_end_with_one_model(digits_shards, tmp_path, strategy):
    import torch.multiprocessing as mp

    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    # 20 steps: the first 640 training rows, 16 per rank per step.
    train_rows = make_rows(tmp_path / "train", 640)
    mp.spawn(_cnn_rank, args=(free_port(), strategy, str(train_rows), str(digits_shards / "test"), str(out),
                              str(ckpt)), nprocs=2)
    got = {}
    for r in (0, 1):
        for line in (out / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            got.setdefault(rec["step"], []).append(rec["loss"])
    expected = reference_losses(train_rows, 20)
    assert sorted(got) == list(range(1, 21))
    for s in range(1, 21):
        assert abs(sum(got[s]) / 2 - expected[s - 1]) <= LOSS_ATOL, (s, got[s], expected[s - 1])
    assert expected[-1] < expected[0] - 0.2  # it learns (2.4 to 2.1 nats in 20 steps)
    f0, f1 = torch.load(out / "final-rank0.pt"), torch.load(out / "final-rank1.pt")
    assert f0["step"] == f1["step"] == 20
    for k, v in f0["model"].items():
        assert torch.equal(f1["model"][k], v), f"{k}: rank 1 ends with a different model"


def make_rows(dst: Path, rows: int) -> Path:
    """The first ``rows`` rows of ``sklearn:digits:train``, sharded as `shipyard data shard`
    writes them (a 20-step run, not 45)."""
    from shipyard.data.sources import Source, open_source
    from shipyard.data.writer import write_dataset

    full = open_source("sklearn:digits:train")
    table = __import__("pyarrow").Table.from_batches(list(full.batches)).slice(0, rows)
    write_dataset(Source("first rows", table.schema, rows, iter(table.to_batches())), str(dst), 300)
    return dst
