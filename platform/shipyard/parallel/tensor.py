"""Tensor parallelism (DTensor ``parallelize_module``) with the model's own TP plan.

The plan (``model.tp_plan()``, or a Hugging Face model's own plan translated: see ``model.py``)
says which linear layers are split by output columns (``ColwiseParallel``) and which by input rows
(``RowwiseParallel``); a column-split layer feeding a row-split one needs no communication between
them, and each block ends in one all-reduce. Parameters become DTensors on the tp mesh, so DCP
saves each shard under the full tensor's name and can load it at another tp degree (tp 2 -> tp 1).

With more workers than ``tp`` (``dp = world / tp`` replicas), the replicas average gradients
through ``replicate`` (FSDP2's data-parallel mode: parameters stay whole along dp), which unlike
DDP accepts DTensor parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import parallelize_module

from shipyard.parallel.activation_checkpoint import apply_activation_checkpoint
from shipyard.parallel.mesh import device_mesh, parallel_dims
from shipyard.parallel.model import tp_plan


def parallelize(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    return parallelize_module(model, tp_mesh, tp_plan(model))


def apply_tensor(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                 strategy) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    dims = parallel_dims(strategy, dist.get_world_size())
    mesh = device_mesh(dims, device)
    model = model.to(device)
    parallelize(model, mesh["tp"])
    if strategy.activation_checkpoint:
        apply_activation_checkpoint(model, strategy)
    if dims.dp > 1:
        from shipyard.torch_adapter import replicate

        replicate(model, mesh=mesh["dp"])
    return model, optimizer_fn(model.parameters())
