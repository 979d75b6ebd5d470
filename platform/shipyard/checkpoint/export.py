"""`shipyard checkpoints export`: one committed checkpoint as one plain ``torch.save`` file."""

from __future__ import annotations

import io

import torch
from fsspec.implementations.local import LocalFileSystem

from shipyard import storage
from shipyard.checkpoint import dcp
from shipyard.checkpoint.store import CheckpointStore, CommitRecord
from shipyard.errors import CheckpointError


def find(store: CheckpointStore, step: int | None) -> CommitRecord:
    """The committed checkpoint at ``step`` (default: the latest), or a CheckpointError saying what exists."""
    record = store.latest() if step is None else store.read_record(step)
    if record is not None:
        return record
    committed = [c.step for c in store.list() if c.committed]
    have = f"committed steps: {', '.join(map(str, committed))}" if committed else "no committed checkpoints"
    what = "no committed checkpoint" if step is None else f"no committed checkpoint at step {step}"
    raise CheckpointError(f"{store.uri}: {what} ({have})")


def export(store: CheckpointStore, out: str, *, step: int | None = None, model_only: bool = False) -> tuple[CommitRecord, int]:
    """Write the checkpoint to ``out`` (path or URI); returns the record and the bytes written.

    The file is written whole, then moved into place where the filesystem can (local disk), so
    an interrupted export never leaves a truncated ``out`` behind.
    """
    record = find(store, step)
    state = dcp.consolidate(record)
    payload = state.get("model", {}) if model_only else {**state, "step": record.step, "epoch": record.epoch}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        fs, path = storage.filesystem(out)
    except ValueError as e:
        raise CheckpointError(f"OUT.pt: {e}") from None
    tmp = f"{path}.partial"
    try:
        if isinstance(fs, LocalFileSystem):
            fs.pipe_file(tmp, buf.getvalue())
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, buf.getvalue())  # an object PUT is atomic already
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{out}: the directory or bucket to write into does not exist") from None
    except PermissionError:
        raise CheckpointError(f"{out}: permission denied") from None
    return record, buf.getbuffer().nbytes
