"""Every private name of torch that shipyard uses, in one place: no other module imports one.

torch's public API does not reach everything shipyard's checkpoints and parallel strategies
need, so a few internals are used, each here and nowhere else, each with a tripwire in
``tests/unit/test_torch_adapter.py`` that checks what shipyard relies on (a signature, the
attributes a constructor sets). When torch moves or changes one, its tripwire fails naming the
symbol and what shipyard uses it for; fix this module, then raise the torch pin.

What is used, and for what:

- ``torch.distributed.checkpoint._fsspec_filesystem.FsspecReader`` / ``FsspecWriter``: DCP's
  storage on any fsspec URI (S3 included), the only DCP reader/writer that is not local-only.
  ``checkpoint/writer.py`` subclasses the writer and reads the attributes its constructor sets
  (``fs.fs``, ``fs.concat_path``, ``path``, ``sync_files``).
- ``torch.distributed.checkpoint.filesystem._split_by_size_and_type`` and ``_StorageInfo``: the
  writer's own ``write_data`` lays files out as DCP's does, so DCP's reader finds every item.
- ``torch.distributed.checkpoint.state_dict_loader._load_state_dict`` with
  ``default_planner._EmptyStateDictLoadPlanner``: :func:`load_whole`, reading a checkpoint with
  no live model to shape it (``shipyard checkpoint export``); public ``dcp.load`` copies into a
  dict of its own and drops what it read.
- ``torch.distributed._composable.replicate_with_fsdp.replicate``: FSDP2's data-parallel mode
  (parameters whole along dp), under tensor parallelism (``parallel/tensor.py``).
- ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper``: activation
  checkpointing of a block with the state_dict keys unchanged (``parallel/activation_checkpoint.py``).
"""

from __future__ import annotations

from typing import Any

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import _split_by_size_and_type as split_by_size_and_type
from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo


def load_whole(state: dict[str, Any], reader: FsspecReader) -> None:
    """Fill ``state`` (empty) with every tensor and value the checkpoint behind ``reader`` holds,
    resharded tensors whole, in this process alone (no process group)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)


def replicate(module, *, mesh):
    """FSDP2's ``replicate``: ``module``'s parameters whole on every rank of ``mesh``, gradients
    averaged over it."""
    from torch.distributed._composable.replicate_with_fsdp import replicate as _replicate

    return _replicate(module, mesh=mesh)


__all__ = ["FsspecReader", "FsspecWriter", "StorageInfo", "checkpoint_wrapper", "load_whole", "replicate",
           "split_by_size_and_type"]
