"""shipyard.runtime.ray_adapter: one tripwire per private Ray symbol it touches.

Each test imports the symbol and checks what shipyard relies on, without starting Ray. A failure
names the symbol and what shipyard uses it for: fix platform/shipyard/runtime/ray_adapter.py
(and only it), then raise the Ray pin in pyproject.toml.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import ray

from shipyard.runtime import ray_adapter


def tripped(symbol: str, use: str, what: str) -> str:
    return (f"Ray {ray.__version__} changed {symbol}: {what}. shipyard uses it to {use}; "
            "update platform/shipyard/runtime/ray_adapter.py")


def private(module: str, name: str, use: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(tripped(f"{module}.{name}", use, f"it is gone ({e})"))


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# -- in-place recovery: Ray Train replica groups ------------------------------------------------

REPLICA_USE = "replace only a failed rank in place (runtime/regroup.py's backend)"


def test_has_replica_groups_is_read_from_the_backend_class():
    from ray.train.backend import Backend

    assert Backend.__dict__.get("has_replica_groups") is False, tripped(
        "ray.train.backend.Backend.has_replica_groups", REPLICA_USE, "the class attribute is gone or not False")
    for module in ("ray.train.v2._internal.execution.worker_group.worker_group",
                   "ray.train.v2._internal.execution.controller.controller"):
        source = inspect.getsource(importlib.import_module(module))
        assert "backend_cls.has_replica_groups" in source, tripped(
            "Backend.has_replica_groups", REPLICA_USE, f"{module} no longer reads backend_cls.has_replica_groups")


def test_replica_groups_decorator_declares_them():
    from ray.train.backend import Backend

    @ray_adapter.replica_groups
    class B(Backend):
        pass

    assert B.has_replica_groups is True and Backend.has_replica_groups is False


def test_shipyard_backend_matches_rays_torch_backend():
    """Not a private import: shipyard's backend is built on the public Backend; if Ray's torch
    backend (reached through the public TorchConfig.backend_cls) grows behaviour beyond what
    regroup._Backend overrides, this fails and regroup.py must follow."""
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    from shipyard.runtime.regroup import ShipyardTorchConfig, _Backend

    ray_torch = TorchConfig().backend_cls
    added = {k for k in vars(ray_torch) if not k.startswith("__") and k != "_abc_impl"}
    known = {"share_cuda_visible_devices", "on_start", "on_shutdown", "on_training_start", "_setup_tpu_multislice"}
    assert added <= known, (f"Ray's torch backend ({ray_torch.__qualname__}) now also defines "
                            f"{added - known}: see regroup._Backend")
    assert _Backend.share_cuda_visible_devices == ray_torch.share_cuda_visible_devices
    assert set(vars(Backend)) >= {"has_replica_groups", "share_cuda_visible_devices", "on_start", "on_shutdown"}
    assert ShipyardTorchConfig(replace_failed_ranks=True).backend_cls.has_replica_groups is True
    assert ShipyardTorchConfig().backend_cls.has_replica_groups is False


def test_torch_env_is_what_rays_torch_backend_sets(monkeypatch):
    """shipyard's set_torch_env replaces Ray's private _set_torch_distributed_env_vars: same
    variables, same values (checked against Ray's with a stand-in train context)."""
    import ray.train.torch
    import torch

    from shipyard.runtime.regroup import set_torch_env

    class Context:
        def get_local_rank(self): return 1
        def get_local_world_size(self): return 2
        def get_node_rank(self): return 3
        def get_world_rank(self): return 7
        def get_world_size(self): return 8

    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    names = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_TORCH_DEVICE")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    rays = private("ray.train.torch.config", "_set_torch_distributed_env_vars", "compare shipyard's torch env")
    before = dict(os.environ)
    rays()
    ray_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    for name in ray_env:
        monkeypatch.delenv(name)
    set_torch_env()
    ours = {k: v for k, v in os.environ.items() if before.get(k) != v}
    assert ours == ray_env, f"Ray's torch backend now sets {ray_env}, shipyard's set_torch_env {ours}"


# -- elastic resize: controller callbacks ---------------------------------------------------------

ELASTIC_USE = "checkpoint a running group before Ray Train resizes it (runtime/elastic.py)"
CALLBACKS = "ray.train.v2._internal.execution.callback"


# Ray's callback manager calls hooks positionally: what matters is the hook's name and arity.
@pytest.mark.parametrize("name, hooks", [
    ("ControllerCallback", {"before_controller_execute_resize_decision": 1}),
    ("WorkerGroupCallback", {"after_worker_group_start": 1, "before_worker_group_shutdown": 1,
                             "after_worker_group_abort": 1}),
])
def test_controller_callback_hooks(name, hooks):
    cls = private(CALLBACKS, name, ELASTIC_USE)
    assert inspect.isclass(cls) and getattr(ray_adapter, name) is cls
    for hook, arity in hooks.items():
        fn = getattr(cls, hook, None)
        assert callable(fn), tripped(f"{CALLBACKS}.{name}.{hook}", ELASTIC_USE, "the hook is gone")
        assert len(params(fn)) == 1 + arity, tripped(f"{CALLBACKS}.{name}.{hook}", ELASTIC_USE,
                                                     f"its parameters are now {params(fn)}")


def test_what_the_callbacks_are_handed():
    module = "ray.train.v2._internal.execution.worker_group.worker_group"
    group = private(module, "WorkerGroup", ELASTIC_USE)
    for method, head in (("execute", ["self", "fn"]), ("get_workers", ["self"]), ("poll_status", ["self", "timeout"])):
        fn = getattr(group, method, None)
        assert callable(fn) and params(fn)[:len(head)] == head, tripped(
            f"{module}.WorkerGroup.{method}", ELASTIC_USE + " and arm each worker (runtime/regroup.py)",
            f"expected parameters starting {head}")
    status = private("ray.train.v2._internal.execution.worker_group.poll", "WorkerGroupPollStatus", ELASTIC_USE)
    assert isinstance(inspect.getattr_static(status, "finished", None), property), tripped(
        "WorkerGroupPollStatus.finished", ELASTIC_USE, "no longer a property")
    decision = private("ray.train.v2._internal.execution.scaling_policy.scaling_policy", "ResizeDecision", ELASTIC_USE)
    assert "num_workers" in getattr(decision, "__dataclass_fields__", {}), tripped(
        "ResizeDecision.num_workers", ELASTIC_USE, "the field is gone")


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError):
        ray_adapter.NoSuchThing  # noqa: B018


# -- the placement-group cleaner ---------------------------------------------------------------

CLEANER_USE = "drop the placement-group cleaner from Ray Train's default callbacks (runtime/trainer.py)"


def test_placement_group_cleaner_is_a_default_callback():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cleaner = private("ray.train.v2._internal.callbacks.placement_group_callback",
                      "PlacementGroupCleanerCallback", CLEANER_USE)
    create = getattr(TorchTrainer, "_create_default_callbacks", None)
    assert callable(create) and params(create) == ["self"], tripped(
        "TorchTrainer._create_default_callbacks", CLEANER_USE, "the method is gone or takes arguments")
    defaults = TorchTrainer(train_loop_per_worker=lambda: None,
                            scaling_config=ScalingConfig(num_workers=1))._create_default_callbacks()
    assert any(isinstance(cb, cleaner) for cb in defaults), \
        "Ray no longer adds PlacementGroupCleanerCallback: drop runtime/trainer.py and the adapter's decorator"


def test_shipyard_trainer_drops_only_the_placement_group_cleaner():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from shipyard.runtime.trainer import ShipyardTrainer

    kw = dict(train_loop_per_worker=lambda: None, scaling_config=ScalingConfig(num_workers=1))
    ray_defaults = TorchTrainer(**kw)._create_default_callbacks()
    ours = ShipyardTrainer(**kw)._create_default_callbacks()
    assert not any(isinstance(cb, PlacementGroupCleanerCallback) for cb in ours)
    assert [type(cb) for cb in ours] == [type(cb) for cb in ray_defaults
                                         if not isinstance(cb, PlacementGroupCleanerCallback)]


# -- failure causes ----------------------------------------------------------------------------

CAUSE_USE = "name an attempt's cause by the worker's own exception (runtime/attempts.py)"
EXCEPTIONS = "ray.train.v2._internal.exceptions"


def test_user_exception_keeps_the_original_in_base_exc():
    wrapper = private(EXCEPTIONS, "UserExceptionWithTraceback", CAUSE_USE)
    inner = ValueError("the user's")
    e = wrapper(inner, "Traceback ...")
    assert getattr(e, "_base_exc", None) is inner, tripped(
        f"{EXCEPTIONS}.UserExceptionWithTraceback._base_exc", CAUSE_USE, "the attribute no longer holds the exception")
    assert ray_adapter.unwrap_worker_error(e) is inner


def test_health_check_failure_keeps_the_actor_error():
    wrapper = private(EXCEPTIONS, "WorkerHealthCheckFailedError", CAUSE_USE)
    inner = RuntimeError("actor died")
    e = wrapper("health check failed", inner)
    assert getattr(e, "health_check_failure", None) is inner, tripped(
        f"{EXCEPTIONS}.WorkerHealthCheckFailedError.health_check_failure", CAUSE_USE,
        "the attribute no longer holds the actor error")
    nested = private(EXCEPTIONS, "UserExceptionWithTraceback", CAUSE_USE)(e, "tb")
    assert ray_adapter.unwrap_worker_error(nested) is inner
    plain = KeyError("x")
    assert ray_adapter.unwrap_worker_error(plain) is plain


# -- the driver: worker actors, a private cluster ----------------------------------------------


def test_train_worker_class_name():
    use = "find its job's training worker actors in the State API to signal them (runtime/report.py)"
    module = "ray.train.v2._internal.execution.worker_group.worker"
    worker = private(module, "RayTrainWorker", use)
    group = private("ray.train.v2._internal.execution.worker_group.worker_group", "WorkerGroup", use)
    assert worker.__name__ == ray_adapter.TRAIN_WORKER_CLASS, tripped(f"{module}.RayTrainWorker", use, "renamed")
    assert getattr(group, "_worker_cls", None) is worker, tripped(
        "WorkerGroup._worker_cls", use, "worker actors are no longer RayTrainWorker")


def test_init_takes_a_node_ip_address():
    use = "make a private local cluster listen on loopback only (runtime/launcher.py)"
    assert ray_adapter.loopback_only() == {"_node_ip_address": "127.0.0.1"}
    # Not in the signature: ray.init pops it from **kwargs.
    assert 'kwargs.pop("_node_ip_address"' in inspect.getsource(ray.init), tripped(
        "ray.init(_node_ip_address=...)", use, "ray.init no longer takes the keyword")


# -- the server: a head's dashboard --------------------------------------------------------------


def test_gcs_client_and_dashboard_key():
    use = "find a Ray head's dashboard from its GCS address (backends/ray.py dashboard_url)"
    rc = "ray._private.ray_constants"
    assert private(rc, "DASHBOARD_ADDRESS", use) == "dashboard", tripped(f"{rc}.DASHBOARD_ADDRESS", use, "new value")
    namespace = private(rc, "KV_NAMESPACE_DASHBOARD", use)
    assert namespace == b"dashboard", tripped(f"{rc}.KV_NAMESPACE_DASHBOARD", use, f"now {namespace!r}")
    client = private("ray._raylet", "GcsClient", use)
    inner = private("ray._raylet", "InnerGcsClient", use)
    assert inspect.isclass(client) and hasattr(client, "__getattr__"), tripped(
        "ray._raylet.GcsClient", use, "no longer a class forwarding to InnerGcsClient")
    get = getattr(inner, "internal_kv_get", None)
    assert get is not None and params(get) == ["self", "key", "namespace", "timeout"], tripped(
        "ray._raylet.InnerGcsClient.internal_kv_get", use, "its parameters changed")


def test_auth_headers():
    use = "authenticate the server's own HTTP calls to a token-auth dashboard (backends/ray.py _get)"
    module = "ray._private.authentication.http_token_authentication"
    fn = private(module, "get_auth_headers_if_auth_enabled", use)
    assert params(fn) == ["user_headers"], tripped(f"{module}.get_auth_headers_if_auth_enabled", use,
                                                   f"its parameters are now {params(fn)}")
    assert isinstance(ray_adapter.auth_headers(), dict)


def test_the_adapter_imports_neither_ray_train_nor_torch():
    """The server imports it (backends/ray.py): importing it must stay cheap and start nothing."""
    code = ("import sys, shipyard.runtime.ray_adapter; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('ray.train', 'ray._raylet'))"
            " or m == 'ray'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- a run ended on purpose from a callback: its log records dropped -----------------------------

QUIET_USE = "drop the controller's traceback of a run shipyard ends on purpose (attempts.RetryRefused)"


@pytest.mark.parametrize("module", ray_adapter.CONTROLLER_LOGGERS)
def test_the_controller_loggers_are_the_modules_own(module):
    import logging

    logger = private(module, "logger", QUIET_USE)
    assert isinstance(logger, logging.Logger) and logger.name == module, tripped(
        f"{module}.logger", QUIET_USE, f"it is now {logger!r}")


def test_quiet_controller_log_drops_only_the_named_error_once_installed_twice():
    import logging

    class Ended(RuntimeError):
        pass

    ray_adapter.quiet_controller_log(Ended)
    ray_adapter.quiet_controller_log(Ended)
    logger = logging.getLogger(ray_adapter.CONTROLLER_LOGGERS[0])
    ours = [f for f in logger.filters if getattr(f, "shipyard_drops", None) is Ended]
    assert len(ours) == 1

    def record(error):
        return logging.LogRecord("x", logging.ERROR, __file__, 1, "m", None, (type(error), error, None))

    from ray.train.v2.api.exceptions import ControllerError

    assert not ours[0].filter(record(ControllerError(Ended("stop"))))
    assert ours[0].filter(record(ValueError("a real crash")))


WORKER_QUIET_USE = "print no traceback on every rank of a preempted run (runtime/worker.py)"


def test_ray_trains_worker_logs_a_training_error_inside_its_except_and_preempted_is_dropped(caplog):
    """Ray's own function, as its thread runner calls it: inside the except. A Preempted rank's
    record is dropped; any other error's is kept, traceback and all."""
    import logging

    from shipyard.runtime.preemption import Preempted

    util = importlib.import_module(ray_adapter.WORKER_ERROR_LOGGER)
    build = private(ray_adapter.WORKER_ERROR_LOGGER, "construct_user_exception_with_traceback", WORKER_QUIET_USE)
    assert util.logger.name == ray_adapter.WORKER_ERROR_LOGGER, tripped(
        f"{ray_adapter.WORKER_ERROR_LOGGER}.logger", WORKER_QUIET_USE, f"it is now {util.logger!r}")
    ray_adapter.quiet_worker_error_log(Preempted)
    ray_adapter.quiet_worker_error_log(Preempted)
    assert sum(getattr(f, "shipyard_drops", None) is Preempted for f in util.logger.filters) == 1

    def fail(error: BaseException) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=ray_adapter.WORKER_ERROR_LOGGER):
            try:
                raise error
            except BaseException as e:  # noqa: BLE001
                build(e)
        return [r.getMessage() for r in caplog.records if r.name == ray_adapter.WORKER_ERROR_LOGGER]

    kept = fail(ValueError("a real crash"))
    assert len(kept) == 1 and kept[0].startswith(ray_adapter.WORKER_ERROR_PREFIX) and "a real crash" in kept[0], \
        tripped("construct_user_exception_with_traceback", WORKER_QUIET_USE, f"it logged {kept}")
    assert fail(Preempted("checkpoint committed")) == []

# -- the driver: worker output --------------------------------------------------------------------

OUTPUT_USE = "print each rank's output once as [rank N] line instead of Ray's printer (runtime/output.py)"
LOGGING = "ray._private.ray_logging"


def test_stdstream_dispatcher_and_rays_printer():
    dispatcher = private(LOGGING, "global_worker_stdstream_dispatcher", OUTPUT_USE)
    for method, head in (("add_handler", ["self", "name", "handler"]), ("remove_handler", ["self", "name"]),
                         ("emit", ["self", "data"])):
        fn = getattr(type(dispatcher), method, None)
        assert callable(fn) and params(fn) == head, tripped(
            f"{LOGGING}.WorkerStandardStreamDispatcher.{method}", OUTPUT_USE, f"expected parameters {head}")
    assert isinstance(getattr(dispatcher, "handlers", None), list), tripped(
        f"{LOGGING}.global_worker_stdstream_dispatcher.handlers", OUTPUT_USE, "no longer a list of (name, handler)")
    worker = importlib.import_module("ray._private.worker")
    assert worker.global_worker_stdstream_dispatcher is dispatcher, tripped(
        "ray._private.worker.global_worker_stdstream_dispatcher", OUTPUT_USE, "the driver emits into another one")
    connect = inspect.getsource(worker.connect)
    assert f'"{ray_adapter.RAY_PRINTER}"' in connect and "print_to_stdstream" in connect, tripped(
        "ray._private.worker.connect", OUTPUT_USE, f"log_to_driver no longer adds {ray_adapter.RAY_PRINTER!r}")
    assert "global_worker_stdstream_dispatcher.emit(data)" in inspect.getsource(worker.Worker.print_logs), tripped(
        "ray._private.worker.Worker.print_logs", OUTPUT_USE, "worker output no longer reaches the dispatcher")


def test_the_log_monitor_publishes_the_keys_the_adapter_reads():
    monitor = private("ray._private.log_monitor", "LogMonitor", OUTPUT_USE)
    source = inspect.getsource(monitor.check_log_files_and_publish_updates)
    for key in ("ip", "pid", "is_err", "lines", "actor_name", "task_name"):
        assert f'"{key}":' in source, tripped(f"LogMonitor.check_log_files_and_publish_updates[{key!r}]",
                                              OUTPUT_USE, "the published batch no longer has the key")
    # What the driver's printer reads from the batch it is handed (the same keys, after the wire)
    printer = inspect.getsource(importlib.import_module("ray._private.worker").print_worker_logs)
    for read in ('data.get("pid")', 'data.get("ip")', 'data.get("actor_name")', 'data.get("task_name")',
                 'data.get("lines"'):
        assert read in printer, tripped("ray._private.worker.print_worker_logs", OUTPUT_USE, f"no longer reads {read}")
    assert 'data["is_err"]' in inspect.getsource(importlib.import_module("ray._private.worker").print_to_stdstream)
    # On the wire the pid is a string: the adapter makes a number of it.
    batch = private("ray.core.generated.logging_pb2", "LogBatch", OUTPUT_USE)
    from google.protobuf.descriptor import FieldDescriptor

    pid = batch.DESCRIPTOR.fields_by_name.get("pid")
    assert pid is not None and pid.type == FieldDescriptor.TYPE_STRING, tripped(
        "ray.core.generated.logging_pb2.LogBatch.pid", OUTPUT_USE, "no longer a string (see _worker_lines)")


def test_route_worker_output_replaces_rays_printer_and_gives_it_back(monkeypatch):
    dispatcher = private(LOGGING, "global_worker_stdstream_dispatcher", OUTPUT_USE)
    printed, got = [], []
    monkeypatch.setattr(dispatcher, "handlers", [(ray_adapter.RAY_PRINTER, printed.append)])
    stop = ray_adapter.route_worker_output(got.append)
    dispatcher.emit({"ip": "10.0.0.1", "pid": "42", "job": "01000000", "is_err": True, "lines": ["a", "b"],
                     "actor_name": "RayTrainWorker", "task_name": None, "localhost": "10.0.0.1"})
    assert printed == [] and got == [ray_adapter.WorkerLines(pid=42, ip="10.0.0.1", is_err=True, lines=("a", "b"),
                                                             actor="RayTrainWorker", task=None)]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    stop()
    dispatcher.emit({"pid": "raylet", "lines": ["c"]})
    assert [n for n, _ in dispatcher.handlers] == [ray_adapter.RAY_PRINTER] and len(printed) == 1 and len(got) == 1
    stop = ray_adapter.route_worker_output(got.append)
    stop(give_back=False)  # a driver that stops printing worker output for good
    assert dispatcher.handlers == []


def test_print_patch_env():
    use = "make print() on a worker write its line once, to stdout (runtime/launcher.py)"
    constants = "ray.train.v2._internal.constants"
    name = private(constants, "ENABLE_PRINT_PATCH_ENV_VAR", use)
    assert name == ray_adapter.PRINT_PATCH_ENV, tripped(f"{constants}.ENABLE_PRINT_PATCH_ENV_VAR", use, f"now {name!r}")
    patch = private("ray.train.v2._internal.logging.patch_print", "patch_print_function", use)
    assert "ENABLE_PRINT_PATCH_ENV_VAR" in inspect.getsource(patch), tripped(
        "ray.train.v2._internal.logging.patch_print.patch_print_function", use, "no longer reads the variable")


TOKEN_USE = "hide Ray's token-auth notice from `shipyard run`'s output unless --verbose"


def test_the_token_auth_notice_comes_from_the_logger_shipyard_quiets():
    import logging

    logger = private(ray_adapter.TOKEN_AUTH_LOGGER, "logger", TOKEN_USE)
    assert isinstance(logger, logging.Logger) and logger.name == ray_adapter.TOKEN_AUTH_LOGGER, tripped(
        f"{ray_adapter.TOKEN_AUTH_LOGGER}.logger", TOKEN_USE, f"it is now {logger!r}")
    notice = private(ray_adapter.TOKEN_AUTH_LOGGER, "_warn_token_auth_enabled", TOKEN_USE)
    ray_adapter.quiet_token_auth_notice()
    try:
        assert not logger.isEnabledFor(logging.WARNING)
        assert callable(notice)
    finally:
        logger.setLevel(logging.NOTSET)
