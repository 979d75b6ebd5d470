"""Process groups by generation, and recovery in place: a lost rank is replaced, the others stay.

Ray Train's stock torch backend builds the process group once per worker group, and after any
failure Ray Train replaces the whole group: every rank pays a new process, ``import torch`` and
the rest of its start-up again (about 10 s of a 15 s recovery on a 2-core machine, see
tests/bench/recovery.py). shipyard's backend (:class:`ShipyardTorchConfig`) leaves the process
group to the train loop instead, which forms one per *generation* through the run's
``ProgressBoard``: every rank joins (:func:`form`), rank 0 brings the address the group meets at,
and once all ``world`` ranks are in, each calls ``init_process_group``. A generation ends when a
rank is lost.

With ``replace_failed_ranks`` (every fixed-size job but Horovod's), the backend declares Ray
Train *replica groups* of one worker each, so Ray Train replaces only the failed workers and
leaves the others running. A surviving rank sees the loss as a communication error (gloo fails
a collective within milliseconds of a peer's death: :func:`is_peer_loss`) or as a peer's
preemption notice; the train loop then drops its process group and everything built on it
(``TrainContext.abandon``), reports the generation broken, joins the next one with the
replacement, and calls ``train(ctx)`` again, which restores the last committed checkpoint as
any restart does. Everything else a rank raises still fails that rank. ``train(ctx)`` may
therefore run more than once in one process (its file is executed afresh each time).

Elastic jobs and Horovod keep whole-group restarts: an elastic resize changes the world size,
which replica groups cannot, and Horovod's ring is not rebuilt in place here. A fixed-size job
whose node is lost waits until the lost worker can be placed again (as a fixed-size group must).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta

import ray
import ray.train.torch
import torch.distributed as dist
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from shipyard.errors import chain
from shipyard.run.records import GenerationState
from shipyard.runtime import preemption
from shipyard.runtime.ray_adapter import replica_groups

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a rank asks the board whether its generation has formed
WAIT_LOG_S = 30.0  # how often a rank waiting for the others says so


@dataclass
class ShipyardTorchConfig(TorchConfig):
    """TorchConfig for shipyard's workers: the train loop forms the process group (see the module
    docstring); SIGTERM becomes a checkpoint when ``preemption_grace_s`` is set (``preemption.py``)."""

    preemption_grace_s: float | None = None
    replace_failed_ranks: bool = False

    @property
    def backend_cls(self):
        return _ReplaceFailedRanks if self.replace_failed_ranks else _Backend


class _Backend(Backend):
    """Ray's torch backend less the process group: sets the torch variables and arms the preemption
    handler. Built on Ray's public ``Backend``, since all else Ray's (private) torch backend does
    is in the methods overridden here or, for V1 worker groups only, ``on_training_start``."""

    share_cuda_visible_devices = True  # as Ray's torch backend: a node's workers see all its GPUs (NCCL)

    def on_start(self, worker_group, backend_config: ShipyardTorchConfig) -> None:
        worker_group.execute(set_torch_env)
        if backend_config.preemption_grace_s is not None:
            worker_group.execute(preemption.install, backend_config.preemption_grace_s)

    def on_shutdown(self, worker_group, backend_config) -> None:
        pass  # each rank's train loop drops its own process group (leave); the workers may be dead


@replica_groups  # Ray Train: replace a failed worker alone (one worker per replica group)
class _ReplaceFailedRanks(_Backend):
    """The backend of jobs that replace failed ranks in place (see the module docstring)."""


def set_torch_env() -> None:
    """The variables ``torchrun`` sets (and Ray's torch backend: the same names and values), on a
    training worker; Hugging Face Accelerate reads ``ACCELERATE_TORCH_DEVICE``."""
    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    os.environ["NODE_RANK"] = str(context.get_node_rank())
    os.environ["RANK"] = str(context.get_world_rank())
    os.environ["WORLD_SIZE"] = str(context.get_world_size())
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(ray.train.torch.get_device())


def address_and_port() -> tuple[str, int]:
    """This node's IP as Ray knows it (reachable from the other nodes) and a port free on it."""
    address = ray.util.get_node_ip_address()
    with closing(socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("", 0))
        return address, s.getsockname()[1]


def form(board, rank: int, world: int, backend: str, timeout_s: float) -> int | None:
    """Join the next generation and initialise the default process group with it.

    Returns the generation's number, or None when no further attempt may start (max_failures
    spent: the caller returns and the driver reports why)."""
    since = last_log = time.monotonic()
    while True:
        master = address_and_port() if rank == 0 else None
        number = ray.get(board.join.remote(rank, world, master))
        while (answer := ray.get(board.formed.remote(number))) is None:
            if time.monotonic() - last_log > WAIT_LOG_S:
                last_log = time.monotonic()
                log.info("rank %d: waiting %.0fs for the other ranks to join process group %d",
                         rank, last_log - since, number)
            time.sleep(POLL_S)
        if answer.state is GenerationState.REFUSED:
            return None
        if answer.superseded:  # it broke again before it formed: join the next one
            continue
        address, port = answer.master
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        return number


def leave() -> None:
    """Drop this rank's process groups (the default one and every group made from it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_peer_loss(error: BaseException) -> bool:
    """Whether ``error`` says a peer of this rank's process group is gone (rather than this rank's
    own failure): a torch.distributed error, or gloo's, anywhere in its chain (``errors.chain``)."""
    return any(isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "/gloo/" in str(e))
               for e in chain(error))
