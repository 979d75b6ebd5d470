"""Every private name of Ray that shipyard uses, in one place: no other module imports one.

Ray's public API does not reach everything shipyard's recovery and server need, so a few
internals are used, each here and nowhere else, each with a tripwire in
``tests/unit/test_ray_adapter.py`` that imports it without starting Ray and checks what shipyard
relies on (a class with these methods, a function with this signature, an attribute set by this
constructor). When Ray moves or changes one, its tripwire fails naming the symbol and what
shipyard uses it for; fix this module, nothing else.

What is used, and for what:

- ``ray.train.backend.Backend.has_replica_groups`` (TorchFT's flag, read by Ray Train v2's worker
  group and controller): :func:`replica_groups`, in-place recovery (``regroup.py``).
- ``ray.train.v2._internal.execution.callback.ControllerCallback`` and ``WorkerGroupCallback``,
  and what their hooks are handed (the ``WorkerGroup``, its ``WorkerGroupPollStatus``, the
  ``ResizeDecision``): ``elastic.GrowWithCheckpoint`` checkpoints a running group before Ray
  Train resizes it. ``WorkerGroup.execute`` also arms each worker (``regroup.py``).
- ``ray.train.v2._internal.callbacks.placement_group_callback.PlacementGroupCleanerCallback`` and
  ``TorchTrainer._create_default_callbacks``: :func:`without_placement_group_cleaner` (why:
  ``runtime/trainer.py``).
- ``UserExceptionWithTraceback._base_exc`` and ``WorkerHealthCheckFailedError.health_check_failure``
  (``ray.train.v2._internal.exceptions``): :func:`unwrap_worker_error`, so an attempt's cause is
  the worker's own exception (``attempts.py``).
- ``RayTrainWorker``, the class of Ray Train v2's worker actors: :data:`TRAIN_WORKER_CLASS`, by
  which the driver finds its job's training workers to signal them (``report.py``).
- The loggers of Ray Train v2's controller and failure policy
  (``ray.train.v2._internal.execution.controller.controller``,
  ``...failure_handling.default``), and the behaviour that an exception raised by a
  ``UserCallback`` ends the run without a retry (the controller wraps it in a ``ControllerError``,
  which its failure policy does not retry): :func:`quiet_controller_log`, so that a run shipyard
  stops on purpose (``attempts.RetryRefused``) ends without Ray logging it as a crash.
- The logger of ``ray.train.v2._internal.util`` and its "Error in training function" record,
  logged inside the ``except`` that caught a training function's exception:
  :func:`quiet_worker_error_log`, so a preempted rank (``preemption.Preempted``) prints no traceback.
- ``ray.init(_node_ip_address=...)``: :func:`loopback_only`, a private local cluster listens on
  loopback only (``launcher.py``).
- ``ray._raylet.GcsClient``, ``ray._private.ray_constants.DASHBOARD_ADDRESS`` and
  ``KV_NAMESPACE_DASHBOARD``: :func:`dashboard_address`, the server finds a head's dashboard
  from its GCS address (``backends/ray.py``).
- ``ray._private.authentication.http_token_authentication.get_auth_headers_if_auth_enabled``:
  :func:`auth_headers`, the server's own HTTP calls to a token-auth dashboard (``backends/ray.py``).
- ``ray._private.ray_logging.global_worker_stdstream_dispatcher`` (its ``handlers``,
  ``add_handler``, ``remove_handler``), the handler ``ray.init(log_to_driver=True)`` registers
  there as ``"ray_print_logs"``, and the keys of the batches Ray's log monitor publishes
  (``pid``, ``ip``, ``is_err``, ``lines``, ``actor_name``, ``task_name``; ``pid`` arrives as a
  string, ``ray.core.generated.logging_pb2.LogBatch.pid``):
  :func:`route_worker_output`, the driver prints each rank's lines itself, once, as
  ``[rank N] line`` (``runtime/output.py``), instead of Ray's ``(RayTrainWorker pid=...)`` lines.
- ``RAY_TRAIN_ENABLE_PRINT_PATCH`` (``ray.train.v2._internal.constants``): :data:`PRINT_PATCH_ENV`;
  Ray Train's workers otherwise send every ``print()`` to stdout and, through the root logger,
  to stderr as well (every line twice).

**Recovery depends on Ray Train's replica-group mechanism.** Replacing a failed rank in place
(``regroup.py``) works because a backend class with ``has_replica_groups = True`` makes Ray Train
v2 treat every worker as its own replica group: its worker group restarts only the failed
groups, and its controller then also leaves out its preemption watcher (replica groups, as
TorchFT uses them, handle a lost peer themselves; shipyard's ranks do so through the board, and
preemption notices through ``preemption.py``). The flag is declared on Ray's DeveloperAPI
``Backend`` but exists for TorchFT; it is fenced here for that reason. Without it Ray Train
would replace the whole group after any failure, as it does for elastic and Horovod jobs, and
every rank would pay a new process again (``tests/bench/recovery.py``).

**Why Ray is pinned to one minor** (``pyproject.toml``: ``ray>=2.60,<2.61``): Ray Train v2 moves
and reshapes its ``_internal`` package between minors, and the tripwires are checked against
2.60 only. Raising the pin means running ``tests/unit/test_ray_adapter.py`` (then the recovery
tests: ``tests/integration/test_fault_tolerance.py``, ``test_resume_exact.py``,
``test_elastic.py``) on the new version and fixing here whatever trips.

Imports of Ray are lazy, inside the functions (and :func:`__getattr__` for the callback classes):
the server imports this module (``backends/ray.py``) and must not import Ray Train or torch, and
nothing here starts Ray.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

# Ray Train v2 controller callback interfaces, imported on first use (see __getattr__).
_INTERNAL_CLASSES = {
    "ControllerCallback": "ray.train.v2._internal.execution.callback",
    "WorkerGroupCallback": "ray.train.v2._internal.execution.callback",
}

# The class of Ray Train v2's training worker actors, as the State API lists them
# (ray.train.v2._internal.execution.worker_group.worker.RayTrainWorker).
TRAIN_WORKER_CLASS = "RayTrainWorker"

# Ray Train v2 patches print() on its workers to tee each line to the root logger (and so to
# stderr) unless this is "0" (ray.train.v2._internal.constants.ENABLE_PRINT_PATCH_ENV_VAR).
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"

# The name under which ray.init(log_to_driver=True) registers its printer of worker output.
RAY_PRINTER = "ray_print_logs"
SHIPYARD_PRINTER = "shipyard_rank_output"


def __getattr__(name: str):
    module = _INTERNAL_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def replica_groups(backend_cls: type) -> type:
    """Class decorator: Ray Train runs ``backend_cls``'s workers as replica groups of one worker
    each, so it replaces only a failed worker and leaves the others running (see the module
    docstring). ``backend_cls`` is a ``ray.train.backend.Backend``."""
    backend_cls.has_replica_groups = True
    return backend_cls


def without_placement_group_cleaner(trainer_cls: type) -> type:
    """Class decorator: ``trainer_cls`` (a ``TorchTrainer``) without Ray Train's
    ``PlacementGroupCleanerCallback`` among its default callbacks (why: ``runtime/trainer.py``).
    If a Ray upgrade moves the callback, the trainer keeps Ray's defaults (and the tripwire fails)."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # pragma: no cover
        return trainer_cls
    ray_defaults = trainer_cls._create_default_callbacks

    def _create_default_callbacks(self):
        return [cb for cb in ray_defaults(self) if not isinstance(cb, PlacementGroupCleanerCallback)]

    trainer_cls._create_default_callbacks = _create_default_callbacks
    return trainer_cls


def unwrap_worker_error(e: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray Train's wrappers: a user exception is wrapped to
    carry its traceback (``_base_exc``), a failed health check wraps the actor error."""
    for attr in ("_base_exc", "health_check_failure"):
        inner = getattr(e, attr, None)
        if isinstance(inner, BaseException):
            return unwrap_worker_error(inner)
    return e


CONTROLLER_LOGGERS = ("ray.train.v2._internal.execution.controller.controller",
                      "ray.train.v2._internal.execution.failure_handling.default")


def _drop(loggers: tuple[str, ...], exc_type: type[BaseException], error_of) -> None:
    """Add to each logger, once per ``exc_type``, a filter dropping the records for which
    ``error_of(record)`` is (or chains to) an ``exc_type``."""
    import logging

    from shipyard.errors import chain

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = error_of(record)
            return error is None or not any(isinstance(e, exc_type) for e in chain(error))

    for name in loggers:
        logger = logging.getLogger(name)
        if not any(getattr(f, "shipyard_drops", None) is exc_type for f in logger.filters):
            f = _Drop()
            f.shipyard_drops = exc_type
            logger.addFilter(f)


def quiet_controller_log(exc_type: type[BaseException]) -> None:
    """In Ray Train's controller process: drop the controller's and failure policy's log records
    (tracebacks) of an ``exc_type`` raised on purpose by a shipyard callback to end the run.
    Idempotent."""
    _drop(CONTROLLER_LOGGERS, exc_type, lambda record: record.exc_info[1] if record.exc_info else None)


# Ray Train's worker logs a training function's exception as "Error in training function:" and
# its traceback, from inside the ``except`` that caught it (``construct_user_exception_with_traceback``),
# with the traceback in the message rather than as exc_info.
WORKER_ERROR_LOGGER = "ray.train.v2._internal.util"
WORKER_ERROR_PREFIX = "Error in training function"


def quiet_worker_error_log(exc_type: type[BaseException]) -> None:
    """In a training worker: drop Ray Train's "Error in training function" traceback when the
    exception is an ``exc_type`` a rank raises on purpose (``preemption.Preempted``: the checkpoint
    is committed and the group restarts). The exception still ends the attempt, and the run's
    events say why; only the traceback on every rank's stderr goes. Idempotent."""
    import sys

    def error_of(record):
        if not str(record.msg).startswith(WORKER_ERROR_PREFIX):
            return None
        return sys.exc_info()[1]  # the filter runs in the logging thread, inside Ray's except

    _drop((WORKER_ERROR_LOGGER,), exc_type, error_of)


# Says at every ray.init that the cluster uses token auth ("Set RAY_AUTH_MODE=disabled to opt
# out"): true of every head shipyard starts, and nothing a user of `shipyard run` acts on.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_token_auth_notice() -> None:
    """Drop Ray's token-auth notice (a WARNING) on this process's console (``run`` not verbose)."""
    import logging

    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)


def loopback_only() -> dict:
    """``ray.init`` options for a private local cluster that listens on loopback only."""
    return {"_node_ip_address": "127.0.0.1"}


def dashboard_address(gcs_address: str, timeout_s: float) -> str | None:
    """``host:port`` of the dashboard of the Ray head whose GCS is at ``gcs_address``, as the head
    recorded it in its key-value store; None when it runs none. Raises whatever Ray raises when
    nothing answers there (after up to ``timeout_s``)."""
    import ray._private.ray_constants as rc
    from ray._raylet import GcsClient

    value = GcsClient(address=gcs_address).internal_kv_get(rc.DASHBOARD_ADDRESS.encode(),
                                                           namespace=rc.KV_NAMESPACE_DASHBOARD, timeout=timeout_s)
    return value.decode() if value else None


def auth_headers() -> dict[str, str]:
    """The headers Ray's own clients send to a dashboard (the cluster token in token-auth mode;
    none otherwise)."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})


@dataclass(frozen=True)
class WorkerLines:
    """One batch of output lines of one Ray process, as the driver receives it: ``pid`` is the
    process id, or ``"raylet"``, ``"gcs_server"``, ``"autoscaler"``... for Ray's own components;
    ``actor`` the actor's class name (``RayTrainWorker``, ``TrainController``), ``task`` a
    task's name."""

    pid: int | str | None
    ip: str | None
    is_err: bool
    lines: tuple[str, ...]
    actor: str | None = None
    task: str | None = None


def _worker_lines(data: dict) -> WorkerLines:
    pid = data.get("pid")
    if isinstance(pid, str) and pid.isdigit():  # a string on the wire (LogBatch.pid), an int on the node
        pid = int(pid)
    return WorkerLines(pid=pid, ip=data.get("ip"), is_err=bool(data.get("is_err")),
                       lines=tuple(data.get("lines") or ()), actor=data.get("actor_name") or None,
                       task=data.get("task_name") or None)


def route_worker_output(handler: Callable[[WorkerLines], None]) -> Callable[..., None]:
    """Hand every batch of worker output this driver receives to ``handler`` (on Ray's log
    thread), instead of Ray's printer. Returns ``stop(give_back=True)``, which ends that and
    puts Ray's printer back (``give_back=False``: nothing is printed from then on).

    Must be called after ``ray.init(log_to_driver=True)``. Ray's printer is removed first, then
    ``handler`` added: a batch arriving in between (microseconds, at start-up, before any worker
    printed) is not shown. Without Ray's printer there is also no Ray deduplication ("[repeated
    2x across cluster]"), which would fold identical lines of different ranks into one. A handler
    that raises loses that batch (the first such error is logged), not the log thread."""
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    rays = [h for name, h in list(dispatcher.handlers) if name == RAY_PRINTER]
    failed: list[Exception] = []

    def deliver(data: dict) -> None:
        try:
            handler(_worker_lines(data))
        except Exception as e:  # noqa: BLE001 - Ray's log thread must go on
            if not failed:
                failed.append(e)
                logging.getLogger(__name__).exception("worker output lost: %s", e)

    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(SHIPYARD_PRINTER, deliver)

    def stop(give_back: bool = True) -> None:
        dispatcher.remove_handler(SHIPYARD_PRINTER)
        # Only into a connected driver: ray.shutdown() removes Ray's printer by name, and a
        # later ray.init adds a new one.
        if give_back and rays and ray.is_initialized() and \
                not any(name == RAY_PRINTER for name, _ in list(dispatcher.handlers)):
            dispatcher.add_handler(RAY_PRINTER, rays[0])

    return stop
