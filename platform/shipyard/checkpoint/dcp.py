"""What a checkpoint holds and how it is written and read, through torch.distributed.checkpoint.

Model and optimizer go through DCP's ``get_state_dict``/``set_state_dict``, so the saved keys
are the model's own names (no ``module.`` prefix from DDP) and DCP can reshard on load. Every
rank writes its own part straight to the checkpoint URI with DCP's fsspec writer. What differs
per rank (data-stream position, RNG states) goes in one small ``rank-NNNNN.pt`` per rank.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
# Public in the module below; not re-exported by torch.distributed.checkpoint in every release.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shipyard import storage
from shipyard.checkpoint.store import CheckpointStore, CommitRecord
from shipyard.errors import CheckpointError


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(model, optimizer, scheduler) -> dict:
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def save(store: CheckpointStore, *, step: int, epoch: int, model, optimizer, scheduler=None,
         data_state: dict, strategy: str, keep_last: int | None) -> CommitRecord | None:
    """Collective: every rank calls it at the same step. Returns the record on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        store.clear(step)  # leftovers of a save that crashed before committing
    dist.barrier()
    uri = store.uri_for(step)
    storage.ensure_dir(store.fs, store.path_for(step))
    with store.fs.open(storage.join(store.path_for(step), rank_file(rank)), "wb") as f:
        torch.save({"data": data_state, "rng": rng_state()}, f)
    dcp.save(_app_state(model, optimizer, scheduler),
             storage_writer=FsspecWriter(uri, **storage.storage_options(uri)))
    data_states: list = [None] * world
    dist.all_gather_object(data_states, data_state)
    record = None
    if rank == 0:
        record = store.commit(CommitRecord(step=step, epoch=epoch, world=world, strategy=strategy,
                                           time=time.time(), data=data_states))
        store.prune(keep_last)
    dist.barrier()
    return record


def restore(store: CheckpointStore, record: CommitRecord, *, model, optimizer, scheduler=None) -> dict | None:
    """Load model/optimizer/scheduler in place; return this rank's saved per-rank state, if any."""
    uri = record.uri
    state = _app_state(model, optimizer, scheduler)
    try:
        dcp.load(state, storage_reader=FsspecReader(uri, **storage.storage_options(uri)))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"{uri}: cannot load into this model: {_short(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    path = storage.join(store.path_for(record.step), rank_file(dist.get_rank()))
    if not store.fs.exists(path):
        return None  # saved with fewer ranks
    with store.fs.open(path, "rb") as f:
        return torch.load(f, weights_only=False)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    keys = [line.strip() for line in text if "key" in line.lower() or "size" in line.lower()]
    return "; ".join(keys[:3]) if keys else (text[-1] if text else type(e).__name__)
