"""Activation checkpointing: each block keeps only its input and recomputes the rest in backward.

Applied per block (``model.layers``, or what ``model.py`` finds instead), after tensor parallelism
and before FSDP, as torchtitan does: the recomputation then sees the same sharded/DTensor modules
as the forward, and FSDP's per-block all-gather wraps the checkpointed block, so recomputing it
gathers its parameters once more in backward rather than keeping them. The wrapper adds
``_checkpoint_wrapped_module`` to parameter names; DCP's ``get_state_dict`` strips it, so
checkpoint keys do not depend on this option (a job may turn it on or off across a resume).
"""

from __future__ import annotations

from torch import nn

from shipyard.parallel.model import blocks, set_block
from shipyard.torch_adapter import checkpoint_wrapper


def apply_activation_checkpoint(model: nn.Module, strategy=None, found=None) -> nn.Module:
    """``found``: the ``(fqn, block)`` pairs to wrap, when not :func:`blocks`' (a pipeline stage
    wraps the blocks it kept, found on the whole model before the cut)."""
    for fqn, block in blocks(model, strategy) if found is None else found:
        set_block(model, fqn, checkpoint_wrapper(block, preserve_rng_state=True))
    return model
