"""Turns a JobSpec into a Ray Train run: checks, Ray connection, TorchTrainer, progress, result.

``shipyard run`` calls :func:`launch` in the foreground; submitted jobs (later) run the same
function as their Ray job entrypoint, so both behave alike.

With an ``output`` (:class:`~shipyard.runtime.output.RankOutput`), the workers' output reaches
the driver through it rather than through Ray's printer: each rank's lines once, prefixed, and
Ray's own INFO lines (the driver's ``ray`` logger, Ray Train's) only when it is verbose.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from shipyard.checkpoint import CheckpointStore
from shipyard.config import Settings, forwarded_env
from shipyard.errors import UserError, chain
from shipyard.run.records import RunSnapshot
from shipyard.runtime import stopping
from shipyard.runtime.output import RankOutput
from shipyard.runtime.ray_adapter import PRINT_PATCH_ENV, loopback_only, quiet_token_auth_notice, route_worker_output
from shipyard.spec import JobSpec

POLL_S = 1.0  # the driver shares the machine with the workers: poll gently


@dataclass
class RunResult:
    ok: bool
    seconds: float
    snapshot: RunSnapshot = field(default_factory=RunSnapshot)
    error: str | None = None
    user_error: bool = False
    already_finished: str | None = None  # the line saying so, when the job had finished before (no training)


def preflight(spec: JobSpec) -> JobSpec:
    """Fail before any worker starts, naming the field and URI, when inputs are unusable (or,
    for a job from a shared server, outside its tenant's storage roots: checked again here).
    The checks themselves are :mod:`shipyard.preflight`'s; each takes seconds at most.

    Returns the spec with its checkpoint line pinned (``checkpoint.line``: the one this run
    starts, or the one the URI's ``LINE.json`` names now), so that every rank and every restart
    of this run reads and writes the same line."""
    from shipyard import preflight as checks
    from shipyard.scopes import check_from_env

    check_from_env(spec, dict(os.environ))
    if spec.entry_target.endswith(".py"):
        path = os.path.join(spec.workdir, spec.entry_target)
        if not os.path.isfile(path):
            raise UserError(f"entrypoint: {spec.entry_target} not found in {spec.workdir}")
        with open(path, "rb") as f:
            checks.check_entrypoint_source(f.read(), spec.entry_target, spec.entry_function)
    checks.check_endpoints(spec)
    checks.check_datasets(spec)
    if not spec.checkpoint:
        return spec
    store = CheckpointStore(spec.checkpoint.uri, spec.checkpoint.line)
    store.check_writable()
    store.follow_here()  # a fresh line: later runs of this URI resume from it
    return spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"line": store.line})})


def connect(spec: JobSpec, settings: Settings, verbose: bool = True) -> bool:
    """Join RAY_ADDRESS if set, else start a private local Ray. Returns whether we started it.
    Not ``verbose``: the driver's ``ray`` logger says only warnings ("Started a local Ray
    instance" is not said)."""
    if ray.is_initialized():
        return False
    # Ray Train's controller polls worker health every 2 s by default; a dead worker is then seen
    # 1 s late on average. Polling every 0.5 s costs one small actor call per worker.
    controller_env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
                      # print() on a worker writes its line once (stdout), not also to stderr
                      PRINT_PATCH_ENV: os.environ.get(PRINT_PATCH_ENV, "0")}
    if spec.workers.elastic:
        # After a node is lost, Ray's view of free resources can lag for a few seconds; a group
        # sized on it then waits for workers that cannot be placed. Ray waits 60 s before it sizes
        # the group again; an elastic job would rather go on with fewer workers sooner.
        controller_env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = os.environ.get(
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    runtime_env = {"working_dir": spec.workdir, "env_vars": {**controller_env, **forwarded_env(), **spec.env}}
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        quiet_token_auth_notice()
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=runtime_env, log_to_driver=True, logging_level=level)
        return False
    # The dashboard stays on: Ray Train V2 watches its controller through the State API it serves.
    # A private cluster listens on loopback only.
    ray.init(address="local", runtime_env=runtime_env, log_to_driver=True, logging_level=level, **loopback_only())
    return True


def check_capacity(spec: JobSpec, local: bool) -> None:
    have = ray.cluster_resources()
    n, field = spec.workers.fewest, "workers.min" if spec.workers.elastic else "workers.count"
    need_cpu = n * spec.workers.cpus
    need_gpu = n * spec.workers.gpus
    problems = []
    if need_cpu > have.get("CPU", 0):
        problems.append(f"{need_cpu:g} CPUs ({field} {n} x workers.cpus "
                        f"{spec.workers.cpus:g}), the cluster has {have.get('CPU', 0):g}")
    if need_gpu > have.get("GPU", 0):
        problems.append(f"{need_gpu:g} GPUs ({field} x workers.gpus), the cluster has {have.get('GPU', 0):g}")
    if problems and local:
        raise UserError("workers: the job needs " + "; ".join(problems) + f"; lower {field} or the per-worker resources")


def _trainer(spec: JobSpec, board, settings: Settings, verbose: bool = True):
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from shipyard.runtime.attempts import AttemptsCallback
    from shipyard.runtime.regroup import ShipyardTorchConfig
    from shipyard.runtime.trainer import ShipyardTrainer
    from shipyard.runtime.worker import train_loop

    torch_config = ShipyardTorchConfig(
        preemption_grace_s=spec.checkpoint.preemption_grace_s if spec.checkpoint else None,
        # Replace only the lost ranks; the others stay (regroup.py). Not for a resize or a Horovod ring.
        replace_failed_ranks=spec.restart_in_place and not spec.workers.elastic and spec.strategy.kind != "horovod")
    resources = {"CPU": spec.workers.cpus}
    if spec.workers.gpus:
        resources["GPU"] = spec.workers.gpus
    callbacks = [AttemptsCallback(board)]
    num_workers: int | tuple[int, int] = spec.workers.count
    if spec.workers.elastic:
        from shipyard.runtime.elastic import GrowWithCheckpoint

        num_workers = (spec.workers.min, spec.workers.count)
        callbacks.append(GrowWithCheckpoint(board, spec.checkpoint.preemption_grace_s))
    return ShipyardTrainer(  # TorchTrainer without Ray's placement-group cleaner: see runtime/trainer.py
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "board": board,
                           "replace_failed_ranks": torch_config.replace_failed_ranks,
                           "timeout_s": torch_config.timeout_s},
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=spec.workers.gpus > 0,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=spec.workers.resize_interval_s),
        run_config=RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(settings.home / "ray_results"),
            # Ray retries without limit; the board's ledger enforces max_failures, not counting
            # preemptions (see runtime/attempts.py).
            failure_config=FailureConfig(max_failures=-1),
            callbacks=callbacks,
            # Ray Train's INFO lines ("Started training worker group ...") on its controller's and
            # workers' consoles; its log files under the Ray session keep every level.
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )


def _on_this_node():
    """The driver's node, where Ray Train also puts its controller: the run's record must not be
    lost with a worker node (zero-CPU actors may otherwise land on any node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def launch(spec: JobSpec, on_progress: Callable[[RunSnapshot], None] = lambda s: None,
           settings: Settings | None = None, output: RankOutput | None = None) -> RunResult:
    """Run ``spec`` to its end; ``on_progress`` gets the board's snapshot every second. Without
    ``output``, Ray prints the workers' output as it does by default."""
    from shipyard.runtime.progress import ProgressBoard

    settings = settings or Settings.from_env()
    verbose = output is None or output.options.verbose
    spec = preflight(spec)
    done = stopping.finished_before(spec)
    if done is not None:
        return RunResult(True, 0.0, already_finished=done)
    callers_ray = ray.is_initialized()
    started_ray = connect(spec, settings, verbose)
    stop_output = route_worker_output(output.on_lines) if output is not None else None
    try:
        check_capacity(spec, local=started_ray)
        board = ProgressBoard.options(scheduling_strategy=_on_this_node()).remote(
            spec.max_failures, spec.workers.count, spec.stall_timeout_s, spec.retry_repeated_errors)
        trainer = _trainer(spec, board, settings, verbose)
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # reported below, in the caller's thread
                outcome["error"] = e

        t0 = time.monotonic()
        thread = threading.Thread(target=fit, name="shipyard-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            snapshot = ray.get(board.snapshot.remote())
            if output is not None:
                output.learn(snapshot.processes)
            on_progress(snapshot)
        seconds = time.monotonic() - t0
        snapshot = ray.get(board.snapshot.remote())
        if output is not None:
            output.learn(snapshot.processes)
            output.drain()  # the ranks' last lines, before Ray's log thread stops
        if snapshot.exhausted:  # the ledger refused another attempt (then fit() raised RetryRefused)
            return RunResult(False, seconds, snapshot, snapshot.exhausted, snapshot.user_error)
        if "error" in outcome:
            message, is_user = explain(outcome["error"])
            return RunResult(False, seconds, snapshot, message, is_user)
        return RunResult(True, seconds, snapshot)
    finally:
        if started_ray:
            ray.shutdown()
        if stop_output is not None:
            # A Ray the caller started prints as it did before; ours says nothing more (its
            # workers' late lines would land after the summary).
            stop_output(give_back=callers_ray)
            output.close()


def explain(error: BaseException) -> tuple[str, bool]:
    """The root cause of a failed run, and whether it is the user's to fix: the first
    :class:`UserError` in the error's chain, else the last exception the chain reaches."""
    root = error
    for e in chain(error):
        if isinstance(e, UserError):
            return str(e), True
        root = e
    return f"{type(root).__name__}: {root}", False
