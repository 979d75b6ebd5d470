"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the dp mesh.

Each repeated block (``model.layers``, a Hugging Face model's decoder layers, ...: see
``model.py``) is its own FSDP unit, then the root (embedding, final norm, head): a unit's
parameters are all-gathered just before its forward and freed after it, so at any time a rank holds
its ``1/dp`` shard of everything plus one block in full. The last block is not resharded after
forward: backward needs it at once, so freeing it would only cost an all-gather.

bf16 compute (``MixedPrecisionPolicy``: bf16 parameters for compute, fp32 gradient reduction,
fp32 master weights in the optimizer) is used on GPU only: CPU bf16 matmuls are slow and gloo
has no bf16 reduce on every build, and CPU runs are for tests that compare against fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from shipyard.parallel.activation_checkpoint import apply_activation_checkpoint
from shipyard.parallel.mesh import device_mesh, parallel_dims
from shipyard.parallel.model import blocks


def mp_policy(strategy, device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda" and getattr(strategy, "mixed_precision", "none") == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: torch.nn.Module, dp_mesh, *, reshard_after_forward: bool = True,
          policy: MixedPrecisionPolicy | None = None, strategy=None) -> torch.nn.Module:
    """``fully_shard`` each block, then the root, over ``dp_mesh`` (1-D)."""
    policy = policy or MixedPrecisionPolicy()
    units = blocks(model, strategy)
    for i, (_, block) in enumerate(units):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and i < len(units) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_fsdp(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
               strategy) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    dims = parallel_dims(strategy, dist.get_world_size())
    mesh = device_mesh(dims, device)
    model = model.to(device)
    if strategy.activation_checkpoint:
        apply_activation_checkpoint(model, strategy)
    shard(model, mesh["dp"], reshard_after_forward=strategy.reshard_after_forward, policy=mp_policy(strategy, device),
          strategy=strategy)
    return model, optimizer_fn(model.parameters())


def apply_hybrid(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                 strategy) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """FSDP x TP: tensor parallelism inside each group of ``tp`` ranks, FSDP across the groups.

    TP first (parameters become DTensors on the tp mesh), then ``fully_shard`` over the dp mesh,
    which shards those DTensors along dp too (2-D parameters: ``(Shard(0) over dp, TP's
    placement over tp)``).
    """
    from shipyard.parallel.tensor import parallelize

    dims = parallel_dims(strategy, dist.get_world_size())
    mesh = device_mesh(dims, device)
    model = model.to(device)
    parallelize(model, mesh["tp"])
    if strategy.activation_checkpoint:
        apply_activation_checkpoint(model, strategy)
    shard(model, mesh["dp"], policy=mp_policy(strategy, device), strategy=strategy)
    return model, optimizer_fn(model.parameters())
