"""Gradient-norm clipping that sees the whole model's gradient, however it is split.

``torch.nn.utils.clip_grad_norm_`` computes the norm of the gradients a rank holds. That is the
model's norm under DDP (every rank holds the same, averaged gradient), but only a part of it
under FSDP (a shard of each gradient), TP (DTensor shards next to replicated plain tensors, which
``clip_grad_norm_`` cannot stack together) and pipeline (one stage's parameters). Here each rank
sums the squares of its *local* gradient pieces, grouped by which mesh dimensions they are
sharded over; each group's sum is all-reduced over exactly those dimensions (a replicated piece
is counted once, not once per replica), the pipeline stages' sums are added, and every rank
scales its local pieces by the same factor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, *, pp_group=None, foreach: bool = True) -> torch.Tensor:
    """Scale gradients so that their global 2-norm is at most ``max_norm``; returns that norm
    (before clipping) on every rank. Collective over every rank of the job that holds a part."""
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    groups: dict[tuple, list[torch.Tensor]] = {}
    meshes: dict[tuple, object] = {}
    for g in grads:
        if isinstance(g, DTensor):
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())  # Shard and _StridedShard (FSDP over TP)
            key = (id(g.device_mesh), dims)
            meshes[key] = g.device_mesh
            groups.setdefault(key, []).append(g.to_local())
        else:
            groups.setdefault((None, ()), []).append(g)
    total = torch.zeros((), device=device, dtype=torch.float32)
    for key, local in groups.items():
        sq = torch.stack([t.float().pow(2).sum() for t in local]).sum() if local else total.new_zeros(())
        mesh = meshes.get(key)
        for dim in key[1]:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local:
        if foreach:
            torch._foreach_mul_(local, coef.to(local[0].dtype))
        else:
            for t in local:
                t.mul_(coef.to(t.dtype))
    return norm
