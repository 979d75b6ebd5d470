"""Activation checkpointing: each block keeps only its input and recomputes the rest in backward.

Applied per block (``model.layers``), after tensor parallelism and before FSDP, as torchtitan
does: the recomputation then sees the same sharded/DTensor modules as the forward, and FSDP's
per-block all-gather wraps the checkpointed block, so recomputing it gathers its parameters once
more in backward rather than keeping them. The wrapper adds ``_checkpoint_wrapped_module`` to
parameter names; DCP's ``get_state_dict`` strips it, so checkpoint keys do not depend on this
option (a job may turn it on or off across a resume).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from shipyard.parallel.model import blocks


def apply_activation_checkpoint(model: nn.Module) -> nn.Module:
    layers = getattr(model, "layers", None)
    for name, block in blocks(model):
        layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=True))
    return model
