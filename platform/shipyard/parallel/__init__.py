"""Parallelism strategies, one module per technique.

Each is a function ``apply(model, device, optimizer_fn, strategy) -> (model, optimizer)``: it
wraps or shards the model, then builds the optimizer over what the wrapped model exposes (FSDP
replaces parameters; Horovod wraps the optimizer rather than the model). Horovod is imported only
when a job asks for it.
"""

from shipyard.parallel.ddp import apply_ddp


def _apply_horovod(*args, **kwargs):
    from shipyard.parallel.horovod import apply_horovod

    return apply_horovod(*args, **kwargs)


STRATEGIES = {"ddp": apply_ddp, "horovod": _apply_horovod}

__all__ = ["STRATEGIES", "apply_ddp"]
