"""``strategy.sync_batchnorm`` (ddp): BatchNorm layers become SyncBatchNorm before DDP wraps the
model, on GPU workers; on CPU, where torch's SyncBatchNorm raises in a training forward, the
strategy refuses it before any step, naming the field."""

from __future__ import annotations

import pytest
import torch

from shipyard.errors import UserError
from shipyard.parallel.ddp import apply_ddp
from shipyard.spec import DDPStrategy


def model():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))


def test_sync_batchnorm_is_off_by_default_and_refused_on_cpu():
    assert DDPStrategy().sync_batchnorm is False
    with pytest.raises(UserError, match="strategy.sync_batchnorm"):
        apply_ddp(model(), torch.device("cpu"), lambda p: torch.optim.SGD(p, lr=0.1),
                  DDPStrategy(sync_batchnorm=True))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch's SyncBatchNorm runs only on CUDA (this torch build is CPU-only)")
def test_sync_batchnorm_converts_batchnorm_on_gpu(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped, _ = apply_ddp(model(), torch.device("cuda", 0), lambda p: torch.optim.SGD(p, lr=0.1),
                               DDPStrategy(sync_batchnorm=True))
        assert isinstance(wrapped.module[1], torch.nn.SyncBatchNorm)
        wrapped(torch.randn(2, 1, 5, 5, device="cuda")).sum().backward()  # a training forward runs
    finally:
        dist.destroy_process_group()
