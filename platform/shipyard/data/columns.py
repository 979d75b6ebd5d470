"""``dataset.columns``: which columns a batch holds, their dtypes and their keys.

Without it every column is yielded with the dtype Arrow's type maps to (float64 stays
torch.float64), which silently doubles memory and slows matmuls for CSV-sourced data; with it
the stream reads only the listed columns (the others are never gathered), casts each and keys it
by its rename. Unknown columns fail before training, naming the schema's columns."""

from __future__ import annotations

import logging

import pyarrow as pa

from shipyard.errors import UserError

log = logging.getLogger(__name__)

_TORCH = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16",
          "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


class Columns:
    """The resolved selection: ``{name: (dtype or None, key)}``, checked against a schema."""

    def __init__(self, spec: dict, schema: pa.Schema):
        unknown = [n for n in spec if n not in schema.names]
        if unknown:
            raise UserError(f"dataset.columns: {unknown[0]!r} is not a column of the dataset; its columns are "
                            f"{', '.join(schema.names)}")
        self.plan = {n: (_get(c, "dtype"), _get(c, "rename") or n) for n, c in spec.items()}
        self.names = list(self.plan)

    def apply(self, batch: dict) -> dict:
        """Cast and rename a batch of tensors (only the listed columns are in it)."""
        import torch

        out = {}
        for name, (dtype, key) in self.plan.items():
            t = batch[name]
            if dtype and t.dtype != (want := getattr(torch, _TORCH[dtype])):
                t = t.to(want).pin_memory() if t.is_pinned() else t.to(want)
            out[key] = t
        return out


def _get(c, field: str):
    return c.get(field) if isinstance(c, dict) else getattr(c, field)


def float64_columns(schema: pa.Schema, columns: Columns | None) -> list[str]:
    """Columns that reach the batch as torch.float64 under the default rule (no dtype given)."""
    def f64(t: pa.DataType) -> bool:
        return pa.types.is_float64(t) or (pa.types.is_fixed_size_list(t) and pa.types.is_float64(t.value_type))

    if columns is None:
        return [f.name for f in schema if f64(f.type)]
    return [n for n, (dtype, _) in columns.plan.items() if dtype is None and f64(schema.field(n).type)]


_told: set[str] = set()


def note_float64(uri: str, names: list[str]) -> None:
    """Log once per process (per dataset) which columns arrive as float64, and how to cast them."""
    if not names or uri in _told:
        return
    _told.add(uri)
    example = ", ".join(f"{n}: {{dtype: float32}}" for n in names[:3])
    log.warning("dataset columns %s arrive as torch.float64; to train on float32 set dataset.columns: {%s}",
                ", ".join(names), example)
