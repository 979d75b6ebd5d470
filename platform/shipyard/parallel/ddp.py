"""Data parallel: every rank holds the whole model; DDP averages gradients in buckets.

DDP broadcasts rank 0's buffers (BatchNorm running statistics) at each training forward
(``broadcast_buffers=True``, kept); the platform syncs them the same way before checkpoints and
evaluation (``parallel/buffers.py``). ``strategy.sync_batchnorm`` goes further: BatchNorm layers
normalise with the global batch's statistics (``SyncBatchNorm``), as one process on the
concatenated batch would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from shipyard.errors import UserError


def apply_ddp(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
              strategy=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if getattr(strategy, "sync_batchnorm", False):
        if device.type == "cpu":
            # torch's SyncBatchNorm raises in a training forward on CPU tensors (GPU/XPU only);
            # refused here, before any step, rather than at the first batch.
            raise UserError("strategy.sync_batchnorm: torch's SyncBatchNorm runs on GPU workers only; "
                            "set workers.gpus, or drop sync_batchnorm on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, optimizer_fn(model.parameters())
