"""Data parallel: every rank holds the whole model; DDP averages gradients in buckets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
              strategy=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = model.to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, optimizer_fn(model.parameters())
