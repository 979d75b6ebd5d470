"""``shipyard server``: the API (uvicorn) and the scheduler loop in one process.

Startup: open (and migrate) the store, make sure an admin token exists, load the report key,
connect the backend (starting a local Ray head if no address is given), then serve. The loop
runs in a thread; its first act is :meth:`SchedulerLoop.reconcile`, so a server restarted after
``kill -9`` re-attaches to the runs it left. SIGTERM/SIGINT stop uvicorn gracefully (in-flight
requests finish), then the loop, then a Ray head this process started.

Admin token: ``SHIPYARD_ADMIN_TOKEN`` if set (registered for tenant ``default``); otherwise, the
first time a store has no admin token, one is created, printed once and written to
``<data dir>/admin-token`` (mode 0600).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import UserError

log = logging.getLogger("shipyard.server")
DEFAULT_TENANT = "default"


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


def bootstrap_admin(store, data_dir: Path, say=print) -> None:
    store.create_tenant(DEFAULT_TENANT, exist_ok=True)
    env_token = os.environ.get("SHIPYARD_ADMIN_TOKEN")
    if env_token:
        store.register_token(env_token, DEFAULT_TENANT, admin=True, label="SHIPYARD_ADMIN_TOKEN")
        return
    if any(t.admin and t.revoked_at is None for t in store.list_tokens()):
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


def make_backend(opts: ServerOptions, key: bytes, public_url: str, data_dir: Path):
    """The backend and, for a local Ray head this server started, that head (else None)."""
    from shipyard.api.auth import report_token

    def job_env(job_id: str, submission: str) -> dict[str, str]:
        return {"SHIPYARD_REPORT_URL": f"{public_url}/v1/jobs/{job_id}/report",
                "SHIPYARD_REPORT_TOKEN": report_token(key, job_id)}

    if opts.backend == "kuberay":
        from shipyard.backends.kuberay import KubeRayBackend

        config = os.environ.get("SHIPYARD_CONFIG")
        if not config:
            raise UserError("--backend kuberay: set SHIPYARD_CONFIG to the server config file (its kuberay: section)")
        return KubeRayBackend.from_file(config), None
    if opts.backend != "ray":
        raise UserError(f"--backend: got {opts.backend!r}; expected ray or kuberay")
    head = None
    address = opts.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        from shipyard.backends.ray_head import ensure_head

        head = ensure_head(data_dir, opts.ray_cpus)
        address = head.address
        log.info("local Ray head at %s (%s)", address, "started" if head.started else "already running")
    from shipyard.config import enable_ray_token_auth

    env = {**os.environ, "RAY_ADDRESS": address}
    enable_ray_token_auth(env)  # before ray is imported (the backend imports it)
    if "RAY_AUTH_MODE" in env:
        os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    from shipyard.backends.ray import RayBackend, wait_for_head

    wait_for_head(address)
    return RayBackend(address, job_env=job_env), (head if head is not None and head.started else None)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down, which would kill
        the process before the scheduler loop, the Ray head and the store are closed; here the
        signal only starts the graceful shutdown, and ``serve`` returns normally (exit 0)."""

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
    from shipyard.scheduler.loop import SchedulerLoop
    from shipyard.store import Store

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Ray API poll otherwise
    logging.getLogger("alembic").setLevel(logging.WARNING)
    data_dir = Path(opts.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.open(opts.database_url, data_dir=data_dir)
    bootstrap_admin(store, data_dir, say)
    key = report_key(data_dir)
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
    public_url = (opts.public_url or os.environ.get("SHIPYARD_PUBLIC_URL") or f"http://{host}:{opts.port}").rstrip("/")
    backend, head = make_backend(opts, key, public_url, data_dir)
    loop = SchedulerLoop(store, backend, interval_s=opts.interval_s)
    app = create_app(store, backend, loop, ApiConfig(auth=opts.auth, report_key=key))
    loop.on_tick = app.state.metrics.on_tick
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="shipyard-scheduler", daemon=True)
    thread.start()
    say(f"shipyard server on http://{opts.host}:{opts.port} (store {store.url}, backend {backend.name}"
        f"{' at ' + backend.address if hasattr(backend, 'address') else ''}, auth {'on' if opts.auth else 'OFF'})")
    try:
        # uvicorn installs SIGTERM/SIGINT handlers: it stops accepting, finishes requests, returns.
        _Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                               timeout_graceful_shutdown=10)).run()
    finally:
        stop.set()
        loop.wake()
        thread.join(10)  # a tick in a slow backend call is abandoned: the loop is a daemon
        if head is not None:
            say("stopping the local Ray head")
            head.stop()
        store.close()
