"""Data parallel: every rank holds the whole model; DDP averages gradients in buckets."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: torch.nn.Module, device: torch.device, strategy=None) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
