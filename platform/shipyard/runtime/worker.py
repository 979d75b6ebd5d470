"""The function every Ray Train worker runs: build the TrainContext, call the user's train(ctx)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shipyard.errors import UserError
from shipyard.spec import JobSpec


def load_entrypoint(spec: JobSpec, root: str | None = None) -> Callable:
    """Import ``file.py:function`` (relative to ``root``, default cwd) or ``module:function``."""
    root = root or os.getcwd()
    target, func = spec.entry_target, spec.entry_function
    if target.endswith(".py"):
        path = Path(root) / target
        if not path.is_file():
            raise UserError(f"entrypoint: {target} not found in {root}")
        if root not in sys.path:
            sys.path.insert(0, root)  # so train.py can import its neighbours
        mod_spec = importlib.util.spec_from_file_location(f"shipyard_job_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UserError(f"entrypoint: cannot import module {target!r}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"entrypoint: {target} has no function {func!r}")
    return fn


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: the same for `shipyard run` and submitted jobs."""
    import ray.train
    import ray.train.torch

    from shipyard.runtime.context import TrainContext

    spec = JobSpec.model_validate(config["spec"])
    os.environ.update(spec.env)
    # Ray unpacks the job's working_dir as our cwd; a Ray started by the caller (tests, an
    # in-process launch) has no runtime_env, so fall back to the spec's own workdir.
    root = os.getcwd() if (Path.cwd() / spec.entry_target).exists() else spec.workdir
    entered = time.time()
    board = config.get("board")
    tc = ray.train.get_context()
    if board is not None and ray.get(board.admit.remote(tc.get_world_size())) is not None:
        return  # no further attempt allowed (max_failures, or a user error): the driver reports why
    if board is not None and tc.get_world_rank() == 0:
        board.mark.remote(entered=entered)  # for the recovery breakdown (tests/bench/recovery.py)
    ctx = TrainContext(spec, rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                       local_rank=tc.get_local_rank(), device=ray.train.torch.get_device(),
                       board=board)
    try:
        load_entrypoint(spec, root)(ctx)
    except BaseException:
        ctx._reached()  # rank 0's progress reports are up to a second old: say how far this rank got
        raise
    ctx.close()  # a checkpoint the user took last must be committed before the job ends
    ctx._push(force=True, event="finished")
