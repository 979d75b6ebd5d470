"""Parallelism strategies, one module per technique, each a function applied to a model."""

from shipyard.parallel.ddp import apply_ddp

STRATEGIES = {"ddp": apply_ddp}

__all__ = ["STRATEGIES", "apply_ddp"]
