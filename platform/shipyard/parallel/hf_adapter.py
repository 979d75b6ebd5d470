"""Every name of Hugging Face transformers that shipyard reads, in one place: no other module
reads one. transformers is never imported here: a model of its classes can only exist once the
job imported it, so a job without transformers costs nothing.

What is read, and for what (tripwires: ``tests/unit/test_hf_adapter.py``):

- ``PreTrainedModel``: :func:`is_hf`, whether a model is a transformers model.
- ``model.tp_plan`` (public, transformers 5: the model's merged plan, ``{fqn pattern: style
  string}``, from ``config.base_model_tp_plan`` and each head's): :func:`tp_plan`, tensor parallel
  without a plan written by the user (``model.py`` translates the styles).
- ``model.pp_plan`` (public: ``{module fqn: (inputs, outputs)}`` for the decoders whose forward
  runs with other stages' modules replaced): :func:`pp_plan`, the modules a pipeline cuts along.
- ``_no_split_modules`` (a private class attribute: the block classes accelerate and FSDP must not
  split): :func:`block_classes`, a decoder's repeated blocks without ``strategy.blocks``.
"""

from __future__ import annotations

import sys

from torch import nn


def is_hf(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel``."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's own tensor-parallel plan as transformers states it; empty when it has none."""
    plan = getattr(model, "tp_plan", None) if is_hf(model) else None
    return dict(plan) if isinstance(plan, dict) else {}


def pp_plan(model: nn.Module) -> list[str]:
    """The modules of the model's own pipeline plan (unordered); empty when it has none."""
    plan = getattr(model, "pp_plan", None) if is_hf(model) else None
    return list(plan) if isinstance(plan, dict) else []


def block_classes(model: nn.Module) -> set[str]:
    """The class names of the blocks any module of ``model`` says must not be split."""
    return {c for m in model.modules() for c in (getattr(m, "_no_split_modules", None) or ())}
