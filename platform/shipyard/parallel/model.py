"""What the model-parallel strategies ask of a model, and what they find in it by themselves.

Repeated blocks (:func:`blocks`): FSDP shards each block as its own unit (one all-gather per
block, freed after use) and activation checkpointing wraps each block. They are found, first
match wins:

1. ``strategy.blocks``: a dotted path to a ``ModuleList``/``ModuleDict``/``Sequential``
   (e.g. ``model.layers``); a path that resolves to anything else is a UserError;
2. ``model.layers`` (shipyard's own convention, jobs/lm; torchtitan's ``ModuleDict``);
3. Hugging Face: the ``ModuleList``/``ModuleDict`` whose children are of a class named in some
   module's ``_no_split_modules`` (transformers' name for its repeated block class):
   ``model.layers`` under ``LlamaForCausalLM``, ``transformer.h`` (GPT-2),
   ``bert.encoder.layer`` (BERT);
4. torchvision style: top-level children ``layer1`` .. ``layerN`` (ResNet's stages);
5. the ``ModuleList``/``ModuleDict`` of identically-typed modules holding the most parameters.

With none, a warning (once per model class) says so, and FSDP shards the model as one unit.

Tensor parallelism (:func:`tp_plan`): ``model.tp_plan() -> {fqn pattern: ParallelStyle}``
(``parallelize_module``'s plan; ``*`` matches one name, e.g. ``layers.*.attn.wq``); or, for a
Hugging Face model, its own plan (``model.tp_plan``, which transformers merges from
``config.base_model_tp_plan`` and the head's plan; see ``hf_adapter.py``), translated
style by style: ``colwise``/``rowwise`` to ``ColwiseParallel``/``RowwiseParallel``,
``embedding_rowwise`` (the token embedding split by vocabulary rows) and
``colwise_gather_output`` (``lm_head``, logits gathered whole) to the same styles with replicated
inputs/outputs. HF's attention reshapes with ``view(..., -1, head_dim)``, so a rank's local heads
need no change to the model; any other style is a UserError.

Pipelines (:func:`split_points`): the FQNs before which a pipeline stage begins. A model may
declare candidates, ``model.pipeline_split_points: list[str]`` in forward order (e.g.
``["layers.1", "layers.2", "layers.3"]``; an attribute, so a job may also set it on a Hugging Face
model it built); without them every repeated block but the first (:func:`blocks`) is one. The
pipeline takes ``stages - 1`` of the candidates, spread evenly. How a stage is cut from the model
is ``pipeline.py``'s business.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from shipyard.errors import UserError
from shipyard.parallel import hf_adapter

log = logging.getLogger(__name__)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_warned: set[str] = set()


def blocks(model: nn.Module, strategy=None) -> list[tuple[str, nn.Module]]:
    """``(fqn, block)`` for each repeated block of ``model``, found as the module docstring says."""
    path = getattr(strategy, "blocks", None)
    if path:
        return _children(path, _resolve(model, path))
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.Module):
        return _children("layers", layers)
    found = _hf_blocks(model) or _torchvision_stages(model) or _largest_uniform(model)
    if found:
        return found
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("shipyard: found no repeated blocks in %s (searched strategy.blocks, model.layers, "
                    "_no_split_modules classes, layer1..layerN, ModuleList/ModuleDict of one type): FSDP "
                    "shards the model as one unit and activation checkpointing does nothing; set "
                    "strategy.blocks to the path of its blocks", name)
    return []


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        found = model.get_submodule(path)
    except AttributeError:
        raise UserError(f"strategy.blocks: {type(model).__name__} has no submodule {path!r}; "
                        f"give the dotted path of its ModuleList/ModuleDict of blocks") from None
    if not isinstance(found, _CONTAINERS):
        raise UserError(f"strategy.blocks: {path!r} is a {type(found).__name__}, not a ModuleList/ModuleDict/"
                        f"Sequential of blocks")
    return found


def _children(prefix: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}", m) for n, m in container.named_children()]


def _hf_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = hf_adapter.block_classes(model)
    for name, m in model.named_modules():
        kids = list(m.children())
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and kids and all(type(k).__name__ in classes for k in kids):
            return _children(name, m)
    return []


def _torchvision_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = [(n, m) for n, m in model.named_children() if re.fullmatch(r"layer\d+", n)]
    return sorted(stages, key=lambda s: int(s[0][5:]))


def _largest_uniform(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best, size = [], 0
    for name, m in model.named_modules():
        kids = list(m.children())
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and kids and len({type(k) for k in kids}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = _children(name, m), n
    return best


def set_block(model: nn.Module, fqn: str, block: nn.Module) -> None:
    """Put ``block`` where ``fqn`` (one of :func:`blocks`' names) is."""
    parent, _, leaf = fqn.rpartition(".")
    (model.get_submodule(parent) if parent else model).register_module(leaf, block)


def tp_plan(model: nn.Module) -> dict:
    plan = getattr(model, "tp_plan", None)
    if callable(plan):
        return plan()
    hf = hf_adapter.tp_plan(model)
    if hf:
        return _translate(hf)
    raise UserError(f"strategy tensor/hybrid: {type(model).__name__} declares no tensor-parallel plan; "
                    f"give it a method tp_plan() -> {{fqn: ParallelStyle}} (see jobs/lm/model.py)")


def _translate(hf: dict[str, str]) -> dict:
    """Hugging Face's style strings as DTensor ParallelStyles."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
              "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
              "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate())}
    plan = {}
    for pattern, style in hf.items():
        if style not in styles:
            raise UserError(f"strategy tensor/hybrid: the model's Hugging Face tp plan gives {pattern!r} the style "
                            f"{style!r}, which shipyard does not translate ({', '.join(styles)}); give the model "
                            f"a tp_plan() method instead")
        plan[pattern] = styles[style]()
    return plan


def split_points(model: nn.Module, stages: int, strategy=None) -> list[str]:
    """``stages - 1`` of the model's split points (declared, else its blocks), spread as evenly as
    they allow: the candidates cut the model into ``len + 1`` units, and a stage boundary falls at
    every ``units / stages``-th."""
    points = list(getattr(model, "pipeline_split_points", None) or [])
    what = "pipeline_split_points"
    if not points:
        points, what = [fqn for fqn, _ in blocks(model, strategy)][1:], "repeated blocks after the first"
    if not points:
        raise UserError(f"strategy pipeline: {type(model).__name__} declares no pipeline_split_points and has no "
                        f"repeated blocks to cut between (set strategy.blocks, or give the model "
                        f"pipeline_split_points: the module names a stage may start at; see jobs/lm/model.py)")
    if stages - 1 > len(points):
        raise UserError(f"strategy.stages: {stages} stages need {stages - 1} split points; "
                        f"{type(model).__name__} has {len(points)} ({what}): {points}")
    units = len(points) + 1
    return [points[round(i * units / stages) - 1] for i in range(1, stages)]
