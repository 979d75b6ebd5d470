"""``ctx.state``: the user's own resumable values (best score, patience, curriculum position).

A plain dict, saved with every checkpoint and restored when the first part is prepared. Nothing
in it is pickled: JSON values go into the commit record (``COMMIT.json``'s ``state.json``), tensors
into DCP under ``state.<key>`` with their shape and dtype in ``state.tensors``, so that a restore
can allocate them before DCP reads. Values are checked when a checkpoint is taken, so a value that
cannot be saved fails the save that would have lost it, naming its key.

Checkpoints are untrusted input: what a commit record says is bounded before anything is
allocated or believed (:func:`from_record`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from shipyard.errors import CheckpointError, UserError

MAX_JSON_BYTES = 2**20           # ctx.state's JSON values, encoded
MAX_TENSORS = 1000               # tensors in ctx.state
MAX_TENSOR_BYTES = 4 * 2**30     # all of ctx.state's tensors together
MAX_KEY = 200                    # characters in a key
MAX_DEPTH = 32                   # nested lists/dicts in a JSON value
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class Split:
    """``ctx.state`` as it is saved: the JSON values, the tensors, and the tensors' specs."""

    json: dict
    tensors: dict[str, torch.Tensor]

    def record(self) -> dict:
        """What the commit record holds (``CommitRecord.state``)."""
        if not self.json and not self.tensors:
            return {}
        return {"json": self.json,
                "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for k, t in self.tensors.items()}}


def split(state: dict) -> Split:
    """Check ``ctx.state`` and split it; a UserError names the first key that cannot be saved."""
    if not isinstance(state, dict):
        raise UserError(f"ctx.state: must stay a dict (it was replaced by a {type(state).__name__})")
    values, tensors = {}, {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY or "." in key:
            raise UserError(f"ctx.state: key {key!r} is not a name (a non-empty string of at most {MAX_KEY} "
                            "characters, without '.')")
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor or str(value.dtype).removeprefix("torch.") not in DTYPES:
                raise UserError(f"ctx.state[{key!r}]: a {type(value).__name__} of {value.dtype} cannot be saved "
                                f"(plain tensors of {', '.join(DTYPES)} can)")
            tensors[key] = value.detach()
            continue
        problem = _json_problem(value, 0)
        if problem:
            raise UserError(f"ctx.state[{key!r}]: {problem}; ctx.state holds JSON values (None, bool, int, float, "
                            "str, lists and dicts of them with str keys) and tensors, and nothing is pickled")
        values[key] = value
    encoded = len(json.dumps(values))
    if encoded > MAX_JSON_BYTES:
        raise UserError(f"ctx.state: its JSON values take {encoded} bytes, more than {MAX_JSON_BYTES}; "
                        "keep large data in tensors")
    if len(tensors) > MAX_TENSORS:
        raise UserError(f"ctx.state: {len(tensors)} tensors, at most {MAX_TENSORS}")
    if sum(t.numel() * t.element_size() for t in tensors.values()) > MAX_TENSOR_BYTES:
        raise UserError(f"ctx.state: its tensors take more than {MAX_TENSOR_BYTES} bytes")
    return Split(json.loads(json.dumps(values)), tensors)  # a copy: later edits do not reach a staged save


def _json_problem(value, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None  # inf and nan too: Python's json writes and reads them back
    if isinstance(value, (list, tuple)):
        return next((p for p in (_json_problem(v, depth + 1) for v in value) if p), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"a dict key {k!r} is not a str"
            problem = _json_problem(v, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, torch.Tensor):
        return "a tensor inside a list or dict (tensors may only be top-level values)"
    return f"a {type(value).__name__} is not JSON"


def from_record(saved: dict, uri: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON values and empty tensors (to be filled by DCP) of a commit record's ``state``.

    Bounded before anything is allocated: a record that asks for more than :data:`MAX_TENSORS`
    tensors or :data:`MAX_TENSOR_BYTES` bytes, or a dtype outside :data:`DTYPES`, is refused."""
    if not saved:
        return {}, {}
    values, specs = saved.get("json", {}), saved.get("tensors", {})
    if not isinstance(values, dict) or not isinstance(specs, dict) or set(saved) - {"json", "tensors"}:
        raise CheckpointError(f"{uri}: ctx.state in the commit record is not what shipyard writes")
    if len(json.dumps(values)) > MAX_JSON_BYTES or len(specs) > MAX_TENSORS:
        raise CheckpointError(f"{uri}: ctx.state in the commit record is larger than shipyard writes")
    tensors, total = {}, 0
    for key, spec in specs.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) and isinstance(spec.get("dtype"), str) else None
        if (not isinstance(key, str) or "." in key or dtype is None or not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape)):
            raise CheckpointError(f"{uri}: ctx.state[{key!r}] in the commit record is not a tensor spec "
                                  "shipyard writes")
        total += math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if total > MAX_TENSOR_BYTES:
            raise CheckpointError(f"{uri}: ctx.state's tensors in the commit record exceed {MAX_TENSOR_BYTES} bytes")
        tensors[key] = torch.empty(shape, dtype=dtype)
    return dict(values), tensors
