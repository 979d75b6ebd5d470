"""Make a model's buffers (BatchNorm running statistics) identical across the data-parallel group.

Why this is needed: parameters stay equal across data-parallel replicas (gradients are
averaged), buffers do not. BatchNorm updates ``running_mean``/``running_var`` from the rank's own
batch. DDP (``broadcast_buffers=True``) copies rank 0's buffers to the others at the start of
each training forward, so the last step's update is rank-local; FSDP2 and Horovod never sync
them, so each rank's statistics drift apart for the whole run. A checkpoint stores one copy of a
replicated tensor (DCP picks the rank), and a rank evaluates with its own: without this, the
resumed run starts from whichever rank's statistics were saved, and ranks score held-out data
with different models.

Why a broadcast from data-parallel rank 0, not an average: it is what DDP itself does at the
next forward, so under DDP syncing here changes nothing the training computes (the next
forward would overwrite the other ranks' buffers with rank 0's anyway), and a run resumed from
the checkpoint continues bit-identically to one that was never interrupted. An average would be
a new value that no uninterrupted DDP run ever uses. Under FSDP and Horovod the sync happens at
the same steps in an interrupted and an uninterrupted run (every checkpoint), so both stay
identical too.

Only persistent buffers are synced (those in ``state_dict``: what a checkpoint stores);
non-persistent ones (a rotary embedding's cache) are recomputed, not learned. Integer buffers
(``num_batches_tracked``) are broadcast too. A model without persistent buffers costs nothing:
the buffer list is the same on every rank of the group (same model code), so every rank makes
the same decision to skip without communicating.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers ``model.state_dict()`` holds, in module order (the same on every rank);
    a DTensor buffer's local tensor (data-parallel peers hold the same shard of it)."""
    found = []
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in skip:
                found.append(buf.to_local() if hasattr(buf, "to_local") else buf)
    return found


def sync_buffers(model: torch.nn.Module, group=None) -> int:
    """Broadcast ``model``'s persistent buffers from rank 0 of ``group`` (None: the world) to its
    other ranks, in place (collective over ``group``). Returns how many buffers were synced.

    One broadcast per dtype: the buffers of a dtype are packed into one flat tensor (a ResNet has
    a hundred small BatchNorm buffers; a hundred broadcasts would cost a hundred latencies).
    """
    buffers = persistent_buffers(model)
    if not buffers or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return 0
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault((b.dtype, b.device), []).append(b)
    for same in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in same])
        dist.broadcast(flat, group_src=0, group=group)
        offset = 0
        with torch.no_grad():
            for b in same:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
    return len(buffers)


def dp_group(dims):
    """The data-parallel process group of this rank under ``dims`` (collective to build: every
    rank calls it, in the same order as its other groups). None (the world) when data
    parallelism spans every rank (ddp, fsdp, horovod); callers skip the sync when ``dims.dp == 1``.
    The default backend: buffers live on the device (nccl for CUDA tensors, gloo on CPU)."""
    if dims.dp == dims.world:
        return None
    # Global ranks with the same (pp, tp) coordinates are one data-parallel group.
    groups = {}
    for r in range(dims.world):
        pp, _, tp = dims.coords(r)
        groups.setdefault((pp, tp), []).append(r)
    mine, _ = dist.new_subgroups_by_enumeration(list(groups.values()))
    return mine
