"""Parallelism strategies, one module per technique.

Each is a function ``apply(model, device, optimizer_fn, strategy) -> (model, optimizer)``: it
wraps, shards or cuts the model, then builds the optimizer over what the wrapped model exposes
(FSDP and TP replace parameters with DTensors; a pipeline stage holds only its part; Horovod
wraps the optimizer rather than the model).

| kind       | module                         | mesh (pp, dp, tp), see ``mesh.py``      |
|------------|--------------------------------|-----------------------------------------|
| ddp        | ``ddp.py``                     | (1, world, 1)                           |
| horovod    | ``horovod.py``                 | (1, world, 1)                           |
| fsdp       | ``fsdp.py``                    | (1, world, 1), dp shards                |
| tensor     | ``tensor.py`` (+ ddp over dp)  | (1, world / tp, tp)                     |
| pipeline   | ``pipeline.py``                | (stages, world / stages, 1)             |
| hybrid     | ``tensor.py`` then ``fsdp.py`` | (1, dp_shard, tp), dp shards            |
| custom     | ``custom.py`` (applies nothing) | (pp, world / (pp * tp), tp)            |

Modules are imported when a job asks for their strategy: the spec imports ``mesh`` for its
validation, and that must not pull in torch (or Horovod) where only a spec is checked.
"""

from __future__ import annotations


def _lazy(module: str, name: str):
    def apply(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"shipyard.parallel.{module}"), name)(*args, **kwargs)

    apply.__name__ = name
    return apply


STRATEGIES = {
    "ddp": _lazy("ddp", "apply_ddp"),
    "horovod": _lazy("horovod", "apply_horovod"),
    "fsdp": _lazy("fsdp", "apply_fsdp"),
    "tensor": _lazy("tensor", "apply_tensor"),
    "pipeline": _lazy("pipeline", "apply_pipeline"),
    "hybrid": _lazy("fsdp", "apply_hybrid"),
    "custom": _lazy("custom", "apply_custom"),
}


def __getattr__(name: str):
    if name == "apply_ddp":
        from shipyard.parallel.ddp import apply_ddp

        return apply_ddp
    raise AttributeError(name)


__all__ = ["STRATEGIES", "apply_ddp"]
