"""Gradient accumulation without a reduction per batch: ``ctx.no_sync()``.

With ``gradient_accumulation: n`` a step is ``n`` batches whose gradients add up locally before
one optimizer step. Reducing them across data-parallel ranks after every batch would cost ``n``
all-reduces where the last one alone gives the same sum, so the first ``n - 1`` backwards run
with the wrapper's own switch off: DDP's ``no_sync()`` context, FSDP2's (and ``replicate``'s)
``set_requires_gradient_sync(False)``. Strategies with neither (a pipeline's schedule, Horovod's
optimizer, a model under ``kind: custom`` wrapped by other means) reduce every batch: the sum
is the same, only slower.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn


@contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: nn.Module, *, skip: bool):
    """The context under which a non-final batch's backward leaves gradients unreduced
    (``skip``: this is the step's last batch, whose backward must reduce)."""
    if skip:
        return nullcontext()
    if callable(getattr(model, "no_sync", None)):
        return model.no_sync()
    if callable(getattr(model, "set_requires_gradient_sync", None)):
        return _fsdp_no_sync(model)
    return nullcontext()
