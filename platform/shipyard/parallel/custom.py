"""``kind: custom``: the user's own parallelism; shipyard applies nothing to the model.

``train(ctx)`` builds and wraps the model itself on ``ctx.mesh`` (FSDP2 ``fully_shard``,
``parallelize_module``, torchtitan's ``parallelize_llama``, its own pipeline schedule) and then
calls ``ctx.prepare``, which builds the optimizer over the wrapped model's parameters and restores
the latest checkpoint into it. What stays shipyard's: the data split over the mesh's ``dp``
dimension, checkpoints through DCP (``get_state_dict``/``set_state_dict`` work on plain tensors,
DTensors and FSDP2 modules alike), recovery and reporting. The model is not moved: a wrapped
model's parameters already live where its parallelism put them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def apply_custom(model: torch.nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                 strategy=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    return model, optimizer_fn(model.parameters())
