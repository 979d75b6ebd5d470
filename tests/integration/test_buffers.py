"""BatchNorm buffers across data-parallel ranks (parallel/buffers.py), on real 2-process gloo
groups (torch.multiprocessing: a Ray cluster adds nothing here).

Without a sync, two DDP ranks that read different rows end a step with different running
statistics (the last update is rank-local); ``sync_buffers`` makes them rank 0's, bit for bit.
(jobs/cnn trained under ddp and fsdp through TrainContext, its buffers included: see
test_gallery_strategies.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import free_port, job_module

pytestmark = pytest.mark.integration
_model = job_module("cnn")
ResNet = _model.ResNet

BATCH = 16  # rows per rank


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
