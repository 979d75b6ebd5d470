"""The function every Ray Train worker runs: build the TrainContext, call the user's train(ctx)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from shipyard.errors import UserError, typed_line
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)


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
    """Ray Train's ``train_loop_per_worker``: the same for `shipyard run` and submitted jobs.

    Each pass of the loop is one generation (``regroup.py``): form the process group, build a
    TrainContext (which restores the last checkpoint) and run ``train(ctx)``. A rank that loses a
    peer, when its job replaces failed ranks, leaves that generation and joins the next.

    First the process registers its rank on the board, so that the driver prints its output as
    ``[rank N] line`` (``output.py``). A rank's failure is told once, by Ray Train's worker ("Error
    in training function:" and the traceback, on this process's stderr); the driver drops the
    copies of Ray's controller and raylets.
    """
    import ray.train
    import ray.train.torch

    from shipyard.runtime import deaths, preemption, regroup
    from shipyard.runtime.context import TrainContext
    from shipyard.runtime.ray_adapter import quiet_worker_error_log

    quiet_worker_error_log(preemption.Preempted)  # committed and restarting: no traceback on every rank

    spec = JobSpec.model_validate(config["spec"])
    os.environ.update(spec.env)
    # Ray unpacks the job's working_dir as our cwd; a Ray started by the caller (tests, an
    # in-process launch) has no runtime_env, so fall back to the spec's own workdir.
    root = os.getcwd() if (Path.cwd() / spec.entry_target).exists() else spec.workdir
    board, tc = config["board"], ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    board.process.remote(deaths.this_process(rank, ray.util.get_node_ip_address()))
    backend = "nccl" if spec.workers.gpus else "gloo"
    while True:
        generation = regroup.form(board, rank, world, backend, timeout_s=config.get("timeout_s", 1800))
        if generation is None:
            preemption.finished()
            return  # no further attempt allowed (max_failures, or a user error): the driver reports why
        ctx = None
        try:
            train = load_entrypoint(spec, root)  # afresh each generation: module-level state starts over too
            ctx = TrainContext(spec, rank=rank, world_size=world, local_rank=tc.get_local_rank(),
                               device=ray.train.torch.get_device(), board=board, generation=generation)
            train(ctx)
        except BaseException as e:
            if ctx is not None:
                ctx.reached()  # rank 0's progress reports are up to a second old: say how far this rank got
                ctx.abandon()
            regroup.leave()
            peer_left = isinstance(e, preemption.Preempted) and not preemption.requested()
            if not (config.get("replace_failed_ranks") and (peer_left or regroup.is_peer_loss(e))):
                raise
            cause = typed_line(e)  # the board records it as the generation's cause
            log.warning("rank %d: %s; joining the next process group", rank, cause)
            ray.get(board.broken.remote(generation, rank, cause))
            continue
        ctx.close()  # a checkpoint the user took last must be committed before the job ends
        preemption.finished()  # the SIGTERM Ray stops the workers with is no preemption
        ctx.finished()
        if config.get("replace_failed_ranks"):  # a peer failing now cannot regroup with this rank
            ray.get(board.rank_finished.remote(rank))
        regroup.leave()
        return
