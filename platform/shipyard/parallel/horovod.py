"""Horovod data parallelism inside shipyard's Ray Train workers.

Ray Train V2 refuses ``HorovodTrainer``, so shipyard keeps ``TorchTrainer`` for placement, restarts
and ``FailureConfig``, and starts Horovod itself inside the workers it placed. torch.distributed
(gloo, set up by TorchTrainer) stays initialised beside Horovod: checkpoints (DCP) and the
platform's control messages use it; Horovod carries only the gradient all-reduce.

How Horovod is started here is what ``horovodrun --gloo`` (``horovod/runner/gloo_run.py``) and
``horovod.ray.RayExecutor`` (``horovod/ray/runner.py``) do from their driver, moved onto the
workers, because with TorchTrainer there is no Horovod driver process:

1. Every rank contributes ``(node id, node IP)`` to an all-gather over torch.distributed. From
   that one list every rank computes the same slot layout (:func:`slot_layout`): local rank and
   size per node, cross rank and size per local rank, as Horovod's ``get_host_assignments`` would.
2. Rank 0 starts Horovod's own Gloo rendezvous server (``RendezvousServer``, an HTTP key-value
   store in a thread of rank 0's process) and initialises it with that layout, so it knows the
   size of each rendezvous scope (global, ``local_<node>``, ``cross_<local rank>``).
3. Rank 0 broadcasts the server's ``(address, port)`` with ``broadcast_object_list``.
4. Every rank sets the ``HOROVOD_*`` variables ``gloo_run`` would put into each process's
   environment and calls ``hvd.init()``, which reads them (``gloo_context.cc``) and builds its
   global, local and cross Gloo contexts through the server.

Ranks and sizes come from torch.distributed, so ``hvd.rank() == dist.get_rank()``: the data
stream's sharding and the checkpoint's per-rank files mean the same thing under both.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shipyard.errors import HorovodNotInstalled

log = logging.getLogger(__name__)

# Set by init() on rank 0 only: the rendezvous server lives as long as Horovod does.
_server = None




@dataclass(frozen=True)
class Slot:
    """One rank's place in Horovod's topology (the fields of ``horovod...hosts.SlotInfo``)."""

    hostname: str
    rank: int
    local_rank: int
    cross_rank: int
    size: int
    local_size: int
    cross_size: int


def slot_layout(nodes: list[str]) -> list[Slot]:
    """The Horovod slot of every rank, given the node of each rank (``nodes[rank]``).

    Ranks on one node get local ranks in world-rank order (Ray Train numbers a node's workers
    that way too); the cross rank of a rank is the position of its node among the nodes that
    have a worker with the same local rank. This is ``horovod.ray``'s ``Coordinator`` arithmetic,
    computed from the real world ranks rather than by handing out ranks node after node, because
    Ray Train, not Horovod, chose the ranks.
    """
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    local = {rank: (i, len(ranks)) for ranks in by_node.values() for i, rank in enumerate(ranks)}
    cross_members: dict[int, list[str]] = {}
    for node, ranks in by_node.items():
        for i in range(len(ranks)):
            cross_members.setdefault(i, []).append(node)
    return [Slot(hostname=node, rank=rank, local_rank=local[rank][0], local_size=local[rank][1],
                 cross_rank=cross_members[local[rank][0]].index(node),
                 cross_size=len(cross_members[local[rank][0]]), size=len(nodes))
            for rank, node in enumerate(nodes)]


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise HorovodNotInstalled(
            f"strategy: horovod needs Horovod with PyTorch and Gloo in the workers' Python environment "
            f"({e}); install it with `bash deploy/horovod.sh [VENV]` (builds horovod 0.28.1 once, then "
            f"reuses the cached wheel)") from None
    return hvd


def _where() -> tuple[str, str]:
    """This process's node (a key unique per machine) and the IP other nodes reach it at.

    Inside Ray the node id is that key (hostnames need not be unique, as ``horovod.ray`` notes)
    and Ray's node IP is the address Ray itself uses between nodes.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    host = socket.gethostname()
    return host, socket.gethostbyname(host)


def _iface_of(ip: str) -> str | None:
    """The network interface holding ``ip``, for ``HOROVOD_GLOO_IFACE``.

    Without it Gloo binds to whatever the hostname resolves to, which in containers can be an
    address the other nodes cannot reach; the node IP Ray uses is reachable by construction.
    """
    import psutil  # a dependency of horovod

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def init() -> None:
    """Start Horovod on every rank of the current torch.distributed world (collective).

    Call it on every rank, after torch.distributed is initialised (TorchTrainer does that before
    the user's function runs). A second call while Horovod is running does nothing.
    """
    global _server
    hvd = _hvd()
    if hvd.is_initialized():
        return
    if not dist.is_initialized():
        raise RuntimeError("shipyard.parallel.horovod.init(): torch.distributed is not initialised; "
                           "it runs inside a TorchTrainer worker (or after init_process_group)")
    rank, world = dist.get_rank(), dist.get_world_size()
    node, ip = _where()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, (node, ip))
    slots = slot_layout([n for n, _ in nodes])

    address: list[Any] = [None]
    if rank == 0:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousServer

        _server = RendezvousServer()
        port = _server.start()  # binds every interface on a free port
        _server.init([SlotInfo(**vars(s)) for s in slots])
        address = [(ip, port)]
    dist.broadcast_object_list(address, src=0)
    server_ip, server_port = address[0]

    me = slots[rank]
    env = {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": server_ip,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(server_port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_HOSTNAME": me.hostname,
        "HOROVOD_RANK": str(me.rank),
        "HOROVOD_SIZE": str(me.size),
        "HOROVOD_LOCAL_RANK": str(me.local_rank),
        "HOROVOD_LOCAL_SIZE": str(me.local_size),
        "HOROVOD_CROSS_RANK": str(me.cross_rank),
        "HOROVOD_CROSS_SIZE": str(me.cross_size),
    }
    iface = _iface_of(ip)
    if iface and "HOROVOD_GLOO_IFACE" not in os.environ:
        env["HOROVOD_GLOO_IFACE"] = iface
    os.environ.update(env)
    hvd.init()
    if (hvd.rank(), hvd.size()) != (rank, world):
        raise RuntimeError(f"Horovod started as rank {hvd.rank()} of {hvd.size()}, "
                           f"torch.distributed says {rank} of {world}")
    log.debug("horovod rank %d/%d (local %d/%d) via %s:%s iface=%s", me.rank, me.size, me.local_rank,
              me.local_size, server_ip, server_port, env.get("HOROVOD_GLOO_IFACE"))


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Make every rank's model (parameters and buffers) and optimizer state equal to rank 0's.

    Horovod's ``broadcast_optimizer_state`` initialises an *empty* optimizer state by taking a
    step with zero gradients first. That step is not harmless: decoupled weight decay (AdamW, or
    SGD's ``weight_decay``) moves the parameters, and Adam's step counter starts at 1, so the run
    would differ from the same job under ddp. A freshly built optimizer has the same (empty)
    state on every rank, so it is only broadcast when it holds state, e.g. after rank 0 alone
    loaded some.
    """
    hvd = _hvd()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if optimizer is not None and optimizer.state_dict()["state"]:
        hvd.broadcast_optimizer_state(optimizer, root_rank=0, model=model)


def apply_horovod(model: torch.nn.Module, device: torch.device,
                  optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                  strategy=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Data parallelism with Horovod: returns ``(model, DistributedOptimizer)``.

    Unlike ddp, Horovod does not wrap the model: the optimizer all-reduces (averages) each
    gradient as soon as backward produces it, and ``step()`` waits for those all-reduces. So
    this strategy needs the optimizer factory, and the returned optimizer is the one to step.
    Initial parameters come from rank 0, so ranks that built the model with different seeds
    still start equal. Starts Horovod (:func:`init`) when it is not running yet.

    The wrapper is a new optimizer built from ``optimizer_fn``'s param groups (Horovod's design);
    any state must be loaded into the returned optimizer, which is what shipyard's restore does.
    """
    hvd = _hvd()
    init()
    model = model.to(device)
    optimizer = hvd.DistributedOptimizer(optimizer_fn(model.parameters()),
                                         named_parameters=model.named_parameters())
    broadcast_state(model, optimizer)
    _accept_set_to_none(optimizer)
    return model, optimizer


def _accept_set_to_none(optimizer: torch.optim.Optimizer) -> None:
    """Horovod 0.28's ``zero_grad()`` predates torch's ``set_to_none`` keyword, which user loops
    written for DDP pass (``optimizer.zero_grad(set_to_none=True)``); accept it, keep its check."""
    horovod_zero_grad = optimizer.zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        if set_to_none or getattr(optimizer, "_handles", None):
            return horovod_zero_grad()  # torch's default is set_to_none=True; raises if reduces are pending
        torch.optim.Optimizer.zero_grad(optimizer, set_to_none=False)

    optimizer.zero_grad = zero_grad


def shutdown() -> None:
    """Stop Horovod on this rank, and the rendezvous server on rank 0. Safe to call twice."""
    global _server
    try:
        import horovod.torch as hvd
    except ImportError:
        return
    if hvd.is_initialized():
        hvd.shutdown()
    if _server is not None:
        _server.stop()
        _server = None
