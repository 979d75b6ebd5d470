"""What a checkpoint holds and how it is written and read, through torch.distributed.checkpoint.

Model and optimizer go through DCP's ``get_state_dict``/``set_state_dict``, so the saved keys
are the model's own names (no ``module.`` prefix from DDP) and DCP can reshard on load (a model
whose state_dict hooks rename keys goes through its own ``state_dict``/``load_state_dict``
instead, which DCP cannot map; the optimizer still through DCP). Every
rank writes its own part straight to the checkpoint URI (:mod:`shipyard.checkpoint.writer`; DCP
dedups what DDP replicates, so each rank writes about ``1/world`` of it). What differs per rank
(data-stream position, RNG states) goes in one small ``rank-NNNNN.pt`` per rank.

:func:`write` is the whole save of one rank after the state was captured; the
:class:`~shipyard.checkpoint.saver.Checkpointer` runs it inline (synchronous) or on its upload
thread (asynchronous).
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
# Public in the module below; not re-exported by torch.distributed.checkpoint in every release.
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, get_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)

from shipyard import storage
from shipyard.checkpoint.store import CheckpointStore, CommitRecord
from shipyard.checkpoint.writer import CheckpointWriter
from shipyard.errors import CheckpointError
from shipyard.torch_adapter import FsspecReader, load_whole

# Files per rank: DCP splits a rank's share by size into this many files and they are written at
# once, which is what makes an object store fast (one stream is not).
WRITE_FILES = 16
# The largest file that goes up in one PUT, and the part size of larger ones. Multipart costs two
# more round trips and, on stores such as moto or MinIO, a server-side concatenation, so files of
# typical size (a ~1 GB rank share / 16) stay under it; S3 allows 10,000 parts, so 1.3 TB a file.
WRITE_PART_BYTES = 128 * 2**20


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def rng_state() -> dict:
    """Every generator's state as tensors, ints and tuples only, so the rank file loads with
    ``torch.load(weights_only=True)`` (nothing from storage is unpickled as arbitrary objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Part:
    """One prepared model with its optimizer (and scheduler), saved under its stable ``name``.

    The unnamed part (``name=""``, a job that prepares one model) is saved under the top-level
    keys ``model``/``optim``/``scheduler``, the layout of checkpoints from before parts had
    names, so those still load; a named part under ``parts.<name>.model`` and so on.
    """

    name: str
    model: Any
    optimizer: Any
    scheduler: Any = None


def part_state(model, optimizer, scheduler=None) -> dict:
    """The DCP state dict of one part: references to the live tensors, not copies.

    The optimizer's ``param_groups`` are stored keyed by parameter FQN (``{fqn: hyperparameters}``)
    rather than as torch's list of groups. In the list, group ``i`` names whatever parameters the
    saving rank held; pipeline stages hold different parameters, so every stage would write a
    different ``param_groups.0`` under one key and a loading stage would read another stage's
    (DCP keeps one copy of each key). Keyed by FQN, each stage writes its own entries and any
    strategy reads back the entries of the parameters it holds.
    """
    msd, osd = _get_model_and_optim(model, optimizer)
    osd = {**osd, "param_groups": _groups_by_fqn(osd["param_groups"])}
    state = {"model": msd, "optim": osd}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def _renames_keys(model) -> bool:
    """Whether the model's state_dict hooks rename or split keys (a fused QKV saved as q, k, v):
    its state_dict then has keys that name no parameter or buffer, which DCP's
    ``get_state_dict``/``set_state_dict`` cannot map back to module attributes."""
    inner = getattr(model, "module", model)  # DDP's wrapper: the same keys under "module."
    known = _RENAMES.get(inner)
    if known is None:  # asked at every save: a model's hooks do not change, so once per model
        names = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}
        known = _RENAMES[inner] = not set(inner.state_dict()) <= names
    return known


_RENAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _get_model_and_optim(model, optimizer) -> tuple[dict, dict]:
    """DCP's ``get_state_dict``; for a model that renames its keys (:func:`_renames_keys`), the
    model's own ``state_dict`` (what its hooks make of it) beside DCP's optimizer state dict,
    whose keys come from the parameters' names."""
    if _renames_keys(model):
        return getattr(model, "module", model).state_dict(), get_optimizer_state_dict(model, optimizer)
    return get_state_dict(model, optimizer)


def _set_model_and_optim(model, optimizer, msd: dict, osd: dict) -> None:
    """:func:`set_state_dict`, or the counterpart of :func:`_get_model_and_optim`'s other path:
    the model's own ``load_state_dict`` (its load hooks undo the renaming), DCP's for the optimizer."""
    if _renames_keys(model):
        getattr(model, "module", model).load_state_dict(msd)
        set_optimizer_state_dict(model, optimizer, osd)
    else:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def app_state(parts: list[Part], tensors: dict | None = None) -> dict:
    """The DCP state dict of a training job: every part where :class:`Part` says, and the
    tensors of ``ctx.state`` under ``state``."""
    state: dict = {}
    for p in parts:
        if p.name:
            state.setdefault("parts", {})[p.name] = part_state(p.model, p.optimizer, p.scheduler)
        else:
            state.update(part_state(p.model, p.optimizer, p.scheduler))
    if tensors:
        state["state"] = dict(tensors)
    return state


def part_of(state: dict, name: str) -> dict:
    """Part ``name``'s own dict inside :func:`app_state`'s (the top level for the unnamed part)."""
    return state["parts"][name] if name else state


def write(store: CheckpointStore, *, step: int, epoch: int, state: dict, rank_state: dict,
          strategy: str, keep_last: int | None, group=None, record: dict | None = None,
          committed: Callable[[CommitRecord], None] | None = None) -> CommitRecord | None:
    """Collective over ``group``: write this rank's files, then rank 0 commits and prunes.

    DCP's coordinator writes ``.metadata`` only after gathering every rank's write results, and
    the gather below waits for every rank too, so ``COMMIT.json`` is written after all ranks
    finished. ``record`` adds fields to the commit record (``parts``, ``state``, ``finished``;
    rank 0's are the ones written). ``committed`` is called on rank 0 between the commit and the prune (deleting an
    old checkpoint is no part of writing this one). Returns the record on rank 0, None elsewhere.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    uri, path = store.uri_for(step), store.path_for(step)
    storage.ensure_dir(store.fs, path)
    with store.fs.open(storage.join(path, rank_file(rank)), "wb") as f:
        torch.save(rank_state, f)
    dcp.save(state, process_group=group, storage_writer=CheckpointWriter(
        uri, files=WRITE_FILES, part_bytes=WRITE_PART_BYTES, **storage.storage_options(uri)))
    data_states: list = [None] * world
    dist.all_gather_object(data_states, rank_state["data"], group=group)
    if rank != 0:
        return None
    done = store.commit(CommitRecord(step=step, epoch=epoch, world=world, strategy=strategy,
                                     time=time.time(), data=data_states, **(record or {})))
    if committed is not None:
        committed(done)
    store.prune(keep_last)
    return done


def restore(store: CheckpointStore, record: CommitRecord, *, model, optimizer, scheduler=None) -> dict | None:
    """Load the unnamed part in place; return this rank's saved per-rank state, if any."""
    load_part(record, Part("", model, optimizer, scheduler))
    return read_rank_state(store, record)


def load_part(record: CommitRecord, part: Part) -> None:
    """Load one part's model/optimizer/scheduler in place (collective: DCP reads on every rank)."""
    uri = record.uri
    if part.name not in record.parts and record.parts:
        saved = ", ".join(repr(p) if p else "the unnamed one" for p in record.parts)
        raise CheckpointError(f"{uri}: has no part named {part.name!r} (it holds {saved}). If the parts changed "
                              "on purpose, start from step 0 with `shipyard run --fresh` (or `submit --fresh`)")
    state = app_state([part])
    try:
        dcp.load(state, storage_reader=FsspecReader(uri, **storage.storage_options(uri)))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        what = f"part {part.name!r}" if part.name else "this model"
        raise CheckpointError(f"{uri}: cannot load into {what}: {_short(e)}. If the model changed on "
                              "purpose, start from step 0 with `shipyard run --fresh` (or `submit --fresh`): "
                              "a new line of checkpoints; these are kept") from None
    mine = part_of(state, part.name)
    live_groups = get_optimizer_state_dict(part.model, part.optimizer)["param_groups"]
    optim = {**mine["optim"], "param_groups": _groups_from_fqn(mine["optim"]["param_groups"], live_groups)}
    _set_model_and_optim(part.model, part.optimizer, mine["model"], optim)
    if part.scheduler is not None and "scheduler" in mine:
        part.scheduler.load_state_dict(mine["scheduler"])


def load_tensors(record: CommitRecord, tensors: dict) -> dict:
    """Fill ``tensors`` (``{key: empty tensor}``, shaped as the record says) from DCP's ``state``."""
    if not tensors:
        return {}
    state = {"state": tensors}
    try:
        dcp.load(state, storage_reader=FsspecReader(record.uri, **storage.storage_options(record.uri)))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{record.uri}: cannot read ctx.state's tensors: {_short(e)}") from None
    return state["state"]


def read_rank_state(store: CheckpointStore, record: CommitRecord) -> dict | None:
    """This rank's saved per-rank state (data position, RNG), or None when it had no such rank."""
    path = storage.join(store.path_for(record.step), rank_file(dist.get_rank()))
    if not store.fs.exists(path):
        return None  # saved with fewer ranks
    with store.fs.open(path, "rb") as f:
        try:
            return torch.load(f, weights_only=True)
        except Exception as e:  # noqa: BLE001 - an old or foreign rank file: refuse it, do not unpickle it
            raise CheckpointError(f"{path}: not a rank state file shipyard wrote (it holds more than tensors, "
                                  f"numbers and strings, and is not unpickled: {_short(e)}); start under a new "
                                  "checkpoint.uri") from None


def _groups_by_fqn(groups: list[dict]) -> dict:
    return {fqn: {k: v for k, v in g.items() if k != "params"} for g in groups for fqn in g["params"]}


def _groups_from_fqn(by_fqn: dict, live: list[dict]) -> list[dict]:
    """torch's list of param groups, shaped like the live optimizer's, with the loaded values."""
    out = []
    for g in live:
        loaded = by_fqn.get(g["params"][0], {}) if g["params"] else {}
        out.append({**g, **loaded, "params": g["params"]})
    return out


def consolidate(record: CommitRecord) -> dict:
    """The whole checkpoint as one plain nested dict of tensors, read in this process (no ranks).

    Resharded tensors come back whole: ``{"model": {fqn: tensor}, "optim": {...}, ...}``.
    """
    state: dict = {}
    try:
        load_whole(state, FsspecReader(record.uri, **storage.storage_options(record.uri)))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{record.uri}: cannot read checkpoint: {_short(e)}") from None
    return state


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    keys = [line.strip() for line in text if "key" in line.lower() or "size" in line.lower()]
    return "; ".join(keys[:3]) if keys else (text[-1] if text else type(e).__name__)
