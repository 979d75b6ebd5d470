"""What the model-parallel strategies ask of a model (all optional until a strategy needs it).

- ``model.layers``: a ``ModuleDict``/``ModuleList``/``Sequential`` of the repeated blocks. FSDP
  shards each block as its own unit (one all-gather per block, freed after use) and activation
  checkpointing wraps each block. Without it FSDP shards the model as one unit.
- ``model.tp_plan() -> {fqn pattern: ParallelStyle}``: how tensor parallelism splits the model
  (``parallelize_module``'s plan; ``*`` matches one name, e.g. ``layers.*.attn.wq``).
- ``model.pipeline_split_points: list[str]``: the FQNs before which a pipeline stage may begin, in
  forward order (e.g. ``["layers.1", "layers.2", "layers.3"]``). The model's forward must skip a
  top-level module that is ``None`` and iterate over whatever ``layers`` still holds, so that a
  stage is the same class with the other stages' modules removed (its FQNs, and so its
  checkpoint keys, stay the full model's).
"""

from __future__ import annotations

from torch import nn

from shipyard.errors import UserError


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for each entry of ``model.layers`` (empty when there is none)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.Module):
        return list(layers.named_children())
    return []


def tp_plan(model: nn.Module) -> dict:
    plan = getattr(model, "tp_plan", None)
    if not callable(plan):
        raise UserError(f"strategy tensor/hybrid: {type(model).__name__} declares no tensor-parallel plan; "
                        f"give it a method tp_plan() -> {{fqn: ParallelStyle}} (see jobs/lm/model.py)")
    return plan()


def split_points(model: nn.Module, stages: int) -> list[str]:
    """``stages - 1`` of the model's declared split points, spread as evenly as they allow."""
    points = list(getattr(model, "pipeline_split_points", None) or [])
    if not points:
        raise UserError(f"strategy pipeline: {type(model).__name__} declares no pipeline_split_points "
                        f"(a list of module names a stage may start at; see jobs/lm/model.py)")
    if stages - 1 > len(points):
        raise UserError(f"strategy.stages: {stages} stages need {stages - 1} split points; "
                        f"{type(model).__name__} declares {len(points)}: {points}")
    # Candidates split the model into len(points)+1 units; stage boundaries at even unit counts.
    units = len(points) + 1
    return [points[round(i * units / stages) - 1] for i in range(1, stages)]
