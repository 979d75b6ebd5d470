"""``shipyard server``: the API (uvicorn) and the scheduler loop in one process.

Startup: open (and migrate) the store, make sure an admin token exists, load the report key,
connect the backend (starting a local Ray head if no address is given, or rejoining the one an
earlier server started), then serve. The loop runs in a thread and schedules only while this
process holds the store's scheduler lock (:mod:`shipyard.scheduler.leader`): replicas on one
PostgreSQL serve the API, one schedules. Its first act as holder is :meth:`SchedulerLoop.reconcile`,
so a server restarted after ``kill -9`` re-attaches to the runs it left.

Shutdown (SIGTERM/SIGINT), within a few seconds: the loop is told to stop at once; uvicorn stops
accepting, followed-log streams are ended with a last line (they would otherwise hold the
graceful shutdown until its timeout), in-flight requests get :data:`GRACE_S` to finish; then the
loop's thread is joined, the scheduler lock given up (a standby takes over) and the store
closed. The local Ray head keeps running, and the jobs on it with it: the next server rejoins it
(``<data dir>/ray-head.json``). It stops only with ``shipyard server stop-head`` or when the
server runs with ``--stop-head-on-exit``; a cluster given by ``--ray-address`` is never touched.

Admin token: ``SHIPYARD_ADMIN_TOKEN`` if set (registered for tenant ``default``); otherwise, the
first time a store has no admin token, one is created, printed once and written to
``<data dir>/admin-token`` (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import UserError
from shipyard.store.tenancy import token_state

log = logging.getLogger("shipyard.server")
DEFAULT_TENANT = "default"
GRACE_S = 5.0  # in-flight requests get this long to finish after SIGTERM
LOOP_JOIN_S = 2.0  # a scheduler tick still in a backend call after this is abandoned (restart-safe)


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8321
    data_dir: Path = Path("~/.shipyard/server")
    ray_address: str | None = None
    database_url: str | None = None
    backend: str = "ray"
    auth: bool = True
    public_url: str | None = None  # how job drivers reach this server
    interval_s: float = 2.0
    ray_cpus: float | None = None  # logical CPUs of a local head (default: the machine's)
    package_store: str | None = None  # uploaded code packages: a directory or s3://... (default <data dir>/packages)
    max_package_mb: float = 100.0  # the largest code package (zip) accepted
    storage_root: str | None = None  # tenants' default root: <storage_root>/<tenant>/
    shared_roots: tuple[str, ...] = ()  # read-only for every tenant (a common datasets bucket)
    allow_local_storage: bool = False  # local paths as storage roots (one machine, trusted users)
    shared_ray_trust: bool = False  # several tenants may share one Ray cluster (one trust domain)
    stop_head_on_exit: bool = False  # stop the local Ray head (and its jobs) when the server exits


def private_data_dir(data_dir: Path) -> None:
    """The data dir and everything the server writes there (store, tokens, keys, logs, packages)
    are the server user's alone: 0700 for directories, 0600 for files."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for path in data_dir.iterdir():
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def check_trust(opts: ServerOptions, store) -> None:
    """A Ray cluster has no isolation between its jobs (each can see and reach every other), so
    several tenants on one cluster are one trust domain: the operator must say so."""
    if opts.backend != "ray" or opts.shared_ray_trust:
        return
    tenants = [t.name for t in store.list_tenants()]
    if len(tenants) > 1:
        raise UserError(f"{len(tenants)} tenants ({', '.join(tenants[:5])}) would share one Ray cluster, where "
                        "every job can read and signal every other; pass --shared-ray-trust if they trust each "
                        "other, or use --backend kuberay (one Ray cluster per job)")


def bootstrap_admin(store, data_dir: Path, say=print) -> None:
    store.create_tenant(DEFAULT_TENANT, exist_ok=True)
    env_token = os.environ.get("SHIPYARD_ADMIN_TOKEN")
    if env_token:
        store.register_token(env_token, DEFAULT_TENANT, admin=True, label="SHIPYARD_ADMIN_TOKEN")
        return
    if any(t.admin and token_state(t) == "active" for t in store.list_tokens()):  # an expired one is none
        return
    secret, _ = store.create_token(DEFAULT_TENANT, admin=True, label="first start")
    path = data_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    say(f"admin token (shown once; also in {path}): {secret}")


def report_key(data_dir: Path) -> bytes:
    if os.environ.get("SHIPYARD_REPORT_KEY"):
        return os.environ["SHIPYARD_REPORT_KEY"].encode()
    path = data_dir / "report.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def storage_policy(opts: ServerOptions):
    from shipyard.api.intake import StoragePolicy
    from shipyard.scopes import StorageRoot, normalise

    for root in (opts.storage_root, *opts.shared_roots):
        if root:
            normalise(root, "--storage-root" if root == opts.storage_root else "--shared-root", opts.allow_local_storage)
    return StoragePolicy(opts.storage_root, tuple(StorageRoot(r, writable=False) for r in opts.shared_roots),
                         opts.allow_local_storage)


def tenant_env(data_dir: Path, tenant: str) -> dict[str, str]:
    """The tenant's own variables for its jobs (its S3 credentials, say): ``<data dir>/tenants/
    <tenant>.env``, ``NAME=VALUE`` lines written by the operator (keep it 0600). Nothing of the
    server's own environment reaches a job."""
    path = data_dir / "tenants" / f"{tenant}.env"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name and not name.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def make_job_env(key: bytes, public_url: str, data_dir: Path, store=None, policy=None):
    """``job_env(job_id, submission)``: the server's part of one run's environment, the same for
    every backend (:class:`~shipyard.backends.base.JobEnv`). An allowlist: its report URL, its
    tenant's storage roots (the driver checks the spec against them again), and, secret, the
    report token bound to this job and run and its tenant's own variables (its S3 credentials,
    say); never the server's environment. A tenant variable cannot replace one of the server's."""
    from shipyard.api.auth import report_token
    from shipyard.backends.base import DRIVER_ENV_NAMES, DRIVER_PIDFILE_ENV, SPEC_ENV, JobEnv
    from shipyard.scopes import ROOTS_ENV, to_env

    # Set by the backends themselves (base.driver_env, the spec): a tenant's env file cannot change them.
    reserved = {"SHIPYARD_REPORT_TOKEN", SPEC_ENV, DRIVER_PIDFILE_ENV, *DRIVER_ENV_NAMES}

    def job_env(job_id: str, submission: str) -> JobEnv:
        tenant = store.get_job(job_id).tenant if store is not None else DEFAULT_TENANT
        plain = {"SHIPYARD_REPORT_URL": f"{public_url}/v1/jobs/{job_id}/report"}
        if policy is not None and store is not None:
            plain[ROOTS_ENV] = to_env(policy.roots(store.get_tenant(tenant)), policy.allow_local)
        secret = {k: v for k, v in tenant_env(data_dir, tenant).items() if k not in plain and k not in reserved}
        secret["SHIPYARD_REPORT_TOKEN"] = report_token(key, job_id, submission)
        return JobEnv(plain=plain, secret=secret)

    return job_env


def make_backend(opts: ServerOptions, data_dir: Path, packages=None):
    """The backend and, when it runs on a local Ray head (no ``--ray-address``), that head (else
    None). The run's environment is not the backend's: the loop hands it over at each submit
    (:func:`make_job_env`)."""
    if opts.backend == "kuberay":
        from shipyard.backends.kuberay import KubeRayBackend

        config = os.environ.get("SHIPYARD_CONFIG")
        if not config:
            raise UserError("--backend kuberay: set SHIPYARD_CONFIG to the server config file (its kuberay: section)")
        if packages is not None and not packages.remote:
            log.warning("--backend kuberay with a local package store (%s): pods cannot read it, so jobs with a code "
                        "package (every `shipyard submit`) are refused; use --package-store s3://...", packages.root)
        return KubeRayBackend.from_file(config, packages=packages), None
    if opts.backend != "ray":
        raise UserError(f"--backend: got {opts.backend!r}; expected ray or kuberay")
    head = None
    address = opts.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        from shipyard.backends.ray_head import auth_env, ensure_head

        head = ensure_head(data_dir, opts.ray_cpus)
        os.environ.update(auth_env(data_dir))  # this server's Ray clients send the head's token
        address = head.address
        log.info("local Ray head at %s (%s)", address, "started" if head.started else "already running")
    from shipyard.config import enable_ray_token_auth

    env = {**os.environ, "RAY_ADDRESS": address}
    enable_ray_token_auth(env)  # before ray is imported (the backend imports it)
    if "RAY_AUTH_MODE" in env:
        os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    from shipyard.backends.ray import RayBackend, wait_for_head

    wait_for_head(address)
    return RayBackend(address, forward_env=False, packages=packages), head


class EndStreamsOnShutdown:
    """ASGI wrapper that ends streamed responses (those sent without a length: followed logs)
    when the server shuts down. Such a stream ends only when its run does, so uvicorn's graceful
    shutdown would wait for it until its timeout and then cancel it mid-body; here each one is
    cancelled at once (the same path as a client leaving: its log iterator closes) and its body
    ended cleanly with :data:`NOTE`, so the client sees why and can follow again."""

    NOTE = b"\n[shipyard: the server is shutting down; this log stream ends here]\n"

    def __init__(self, app):
        self.app = app
        self.closing = False
        self._streams: set[asyncio.Task] = set()
        self._ending: set[asyncio.Task] = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        started = done = False

        async def send_(message):
            nonlocal started, done
            if message["type"] == "http.response.start":
                if not any(k.lower() == b"content-length" for k, _ in message.get("headers", ())):
                    self._streams.add(task)
                    if self.closing:
                        self._end(task)  # a stream that started after the shutdown began
                await send(message)
                started = True
                return
            await send(message)
            done = done or (message["type"] == "http.response.body" and not message.get("more_body"))

        try:
            await self.app(scope, receive, send_)
        except asyncio.CancelledError:
            if task not in self._ending:
                raise
            task.uncancel()
            if started and not done:
                await send({"type": "http.response.body", "body": self.NOTE, "more_body": False})
        finally:
            self._streams.discard(task)
            self._ending.discard(task)

    def _end(self, task: asyncio.Task) -> None:
        self._ending.add(task)
        task.cancel()

    def end_all(self) -> None:
        """Called on the event loop when the shutdown begins."""
        self.closing = True
        for task in list(self._streams):
            self._end(task)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down, which would kill
        the process before the scheduler loop and the store are closed; here the signal only
        starts the graceful shutdown, and ``serve`` returns normally (exit 0). When the shutdown
        begins (on the event loop, within 0.1 s of the signal; not in the signal handler, which
        could interrupt the very lock ``on_shutdown`` takes) ``streams`` are ended and
        ``on_shutdown`` run (stop the scheduler loop at once, in parallel with the draining)."""

        def __init__(self, config, streams: EndStreamsOnShutdown | None = None, on_shutdown=()):
            super().__init__(config)
            self.streams, self.on_shutdown = streams, tuple(on_shutdown)

        async def shutdown(self, sockets=None):
            log.info("shutting down: no new connections, streams ended, in-flight requests get %.0fs",
                     self.config.timeout_graceful_shutdown)
            for f in self.on_shutdown:
                f()
            if self.streams is not None:
                self.streams.end_all()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def serve(opts: ServerOptions, say=print) -> None:
    import uvicorn

    _Server = _server_class()

    from shipyard.api.app import ApiConfig, create_app
    from shipyard.packages import MiB, PackageLimits, PackageStore
    from shipyard.scheduler import leader
    from shipyard.scheduler.loop import SchedulerLoop
    from shipyard.store import Store

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Ray API poll otherwise
    logging.getLogger("alembic").setLevel(logging.WARNING)
    data_dir = Path(opts.data_dir).expanduser().resolve()
    private_data_dir(data_dir)
    policy = storage_policy(opts)
    store = Store.open(opts.database_url, data_dir=data_dir)
    bootstrap_admin(store, data_dir, say)
    check_trust(opts, store)
    key = report_key(data_dir)
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
    public_url = (opts.public_url or os.environ.get("SHIPYARD_PUBLIC_URL") or f"http://{host}:{opts.port}").rstrip("/")
    packages = PackageStore.open(opts.package_store, data_dir, PackageLimits(max_bytes=int(opts.max_package_mb * MiB)))
    backend, head = make_backend(opts, data_dir, packages=packages)
    lock = leader.for_store(store.engine.url, data_dir)
    loop = SchedulerLoop(store, backend, interval_s=opts.interval_s, leadership=lock,
                         job_env=make_job_env(key, public_url, data_dir, store, policy))
    from shipyard.api.log_archive import LogArchive

    app = create_app(store, backend, loop, packages=packages, logs=LogArchive(data_dir / "logs"),
                     config=ApiConfig(auth=opts.auth, report_key=key, storage=policy, preflight=True))
    app.state.data_dir = data_dir  # tenants' env files: whose S3 credentials a job gets (preflight)
    loop.on_tick = app.state.metrics.on_tick
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="shipyard-scheduler", daemon=True)
    thread.start()
    say(f"shipyard server on http://{opts.host}:{opts.port} (store {store.url}, backend {backend.name}"
        f"{' at ' + backend.address if hasattr(backend, 'address') else ''}, auth {'on' if opts.auth else 'OFF'})")
    streams = EndStreamsOnShutdown(app)
    server = _Server(uvicorn.Config(streams, host=opts.host, port=opts.port, log_level="warning",
                                    timeout_graceful_shutdown=GRACE_S), streams=streams,
                     on_shutdown=(stop.set, loop.wake))
    try:
        server.run()
    finally:
        t0 = time.monotonic()
        log.info("API stopped")
        stop.set()
        loop.wake()
        thread.join(LOOP_JOIN_S)  # a tick still in a slow backend call is abandoned: the loop is a daemon
        lock.release()
        store.close()
        log.info("stopped: scheduler and store closed %.1fs after the API%s", time.monotonic() - t0,
                 "" if not thread.is_alive() else " (a scheduler tick was abandoned)")
        if head is not None and opts.stop_head_on_exit:
            from shipyard.backends.ray_head import stop_head

            say("stopping the local Ray head and its jobs (--stop-head-on-exit)")
            stop_head(data_dir)
        elif head is not None:
            say(f"the local Ray head at {head.address} keeps running with its jobs; the next server rejoins it "
                "(stop it with `shipyard server stop-head`)")
