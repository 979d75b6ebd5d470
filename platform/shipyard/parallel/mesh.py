"""Device-mesh arithmetic: how a strategy cuts ``workers.count`` ranks into pp x dp x tp.

All of it lives here so that the spec's validation, the data stream's sharding and the
strategies agree on one layout. Ranks are laid out row-major over ``(pp, dp, tp)``, tp
innermost: the ``tp`` ranks that split one layer are neighbours (on a multi-GPU node they share
the fast links, which tensor parallelism needs most), then data-parallel replicas, then pipeline
stages. This is the order ``init_device_mesh`` numbers a mesh of that shape, so the pure
arithmetic below and the process groups built by :func:`device_mesh` are the same thing.

Why ``dp`` stays in the mesh at size 1 (a tp-only job on ``tp`` workers): code that reduces
over the data-parallel dimension (gradient clipping, pipeline gradient averaging) then never
special-cases its absence.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class MeshError(ValueError):
    """A strategy that does not fit the worker count; ``field`` is the strategy field to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ParallelDims:
    world: int
    pp: int = 1
    dp: int = 1
    tp: int = 1
    dp_shard: bool = False  # dp ranks shard parameters (FSDP) rather than replicate them

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(pp index, dp index, tp index)`` of a global rank."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank: which share of the data a rank reads (tp/pp peers read the same)."""
        return self.coords(rank)[1]

    @property
    def names(self) -> tuple[str, str, str]:
        return ("pp", "dp", "tp")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)


def _multiple(field: str, n: int, world: int) -> None:
    if world % n:
        raise MeshError(field, f"{field}={n} needs a multiple of {n} workers, got {world}")


def parallel_dims(strategy, world: int) -> ParallelDims:
    """The mesh of ``strategy`` on ``world`` ranks; raises :class:`MeshError` when it does not fit."""
    kind = strategy.kind
    if kind in ("ddp", "horovod"):
        return ParallelDims(world, dp=world)
    if kind == "fsdp":
        return ParallelDims(world, dp=world, dp_shard=True)
    if kind == "tensor":
        _multiple("tp", strategy.tp, world)
        return ParallelDims(world, dp=world // strategy.tp, tp=strategy.tp)
    if kind == "pipeline":
        _multiple("stages", strategy.stages, world)
        return ParallelDims(world, pp=strategy.stages, dp=world // strategy.stages)
    if kind == "hybrid":
        _multiple("tp", strategy.tp, world)
        dp = strategy.dp_shard or world // strategy.tp
        if dp * strategy.tp != world:
            raise MeshError("dp_shard", f"dp_shard={dp} x tp={strategy.tp} needs {dp * strategy.tp} workers, got {world}")
        return ParallelDims(world, dp=dp, tp=strategy.tp, dp_shard=True)
    if kind == "custom":
        _multiple("tp", strategy.tp, world)
        if world % (strategy.pp * strategy.tp):
            raise MeshError("pp", f"pp={strategy.pp} x tp={strategy.tp} needs a multiple of "
                                  f"{strategy.pp * strategy.tp} workers, got {world}")
        return ParallelDims(world, pp=strategy.pp, dp=world // (strategy.pp * strategy.tp), tp=strategy.tp)
    raise MeshError("kind", f"unknown strategy {kind!r}")


def device_mesh(dims: ParallelDims, device: "torch.device"):
    """The ``(pp, dp, tp)`` DeviceMesh (collective: every rank calls it once)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, dims.shape, mesh_dim_names=dims.names)
