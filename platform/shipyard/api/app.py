"""The FastAPI application: configuration, middleware, error shape, routers.

``create_app(store, backend, loop, config)``: ``backend`` and ``loop`` may be None (the API then
stores and lists jobs but has no logs, and nothing schedules them), which is how the unit tests
run it over SQLite alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass

from fastapi import FastAPI

from shipyard.api import dashboard, errors, routes_admin, routes_jobs, routes_ops, routes_packages, routes_report
from shipyard.api.intake import StoragePolicy
from shipyard.api.metrics import ServerMetrics

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ApiConfig:
    auth: bool = True
    report_key: bytes = b"unset"
    max_user_priority: int = 100  # priorities above this need an admin token
    max_body_bytes: int = MAX_BODY_BYTES
    storage: "StoragePolicy | None" = None  # None: no storage scopes (tests, embedded use); the server sets one
    preflight: bool = False  # check entrypoint, storage endpoints and datasets at submit (the server: on)


class LimitsAndMetrics:
    """Body-size limit, request counts and latency per route template.

    A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware runs each request's app in a task of its own and pipes the response
    through memory streams, a fixed cost that was a noticeable share of a submit's CPU time.
    Latency is measured until the response's headers are sent, so a followed log stream counts
    its time to first byte, not its length.
    """

    def __init__(self, app, config: ApiConfig, metrics: ServerMetrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Driver reports carry metric points buffered while the server was away: a larger cap.
        limit = self.config.max_body_bytes * (16 if scope["path"].endswith("/report") else 1)
        if scope["path"].startswith(routes_packages.PREFIX):  # a code package: its route enforces the package cap
            limit = sys.maxsize
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limit):
            await errors.respond(413, f"request body larger than {limit} bytes")(scope, receive, send)
            return
        receive = _bounded(receive, limit)  # a chunked body (no Content-Length) is counted as it arrives
        t0 = time.perf_counter()
        status: list[int] = []

        async def send_and_measure(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self._observe(scope, message["status"], t0)
            await send(message)

        try:
            await self.app(scope, receive, send_and_measure)
        finally:
            if not status:  # an exception: the server's error handler answers 500 outside this
                self._observe(scope, 500, t0)

    def _observe(self, scope, status: int, t0: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(scope["method"], route, f"{status // 100}xx").inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _bounded(receive, limit: int):
    """``receive`` that raises a 413 once more than ``limit`` body bytes have arrived: whoever
    reads the body (a route, FastAPI's body parsing) stops there, before parsing anything."""
    seen = 0

    async def bounded():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise errors.ApiError(413, f"request body larger than {limit} bytes")
        return message

    return bounded


def create_app(store, backend=None, loop=None, config: ApiConfig = ApiConfig(), packages=None,
               logs=None) -> FastAPI:
    """``logs``: a :class:`~shipyard.api.log_archive.LogArchive`; with a backend that can tail
    logs, the app archives every active run's output into it while it serves."""
    from shipyard import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        archiver = None
        if logs is not None and hasattr(backend, "tail_logs"):
            from shipyard.api.log_archive import LogArchiver

            archiver = LogArchiver(store, backend, logs)
            task = asyncio.create_task(archiver.run(), name="log-archiver")
        try:
            yield
        finally:
            if archiver is not None:
                task.cancel()
                await archiver.stop()

    app = FastAPI(title="shipyard", version=__version__, openapi_url="/openapi.json", lifespan=lifespan,
                  description="Submit, watch and cancel distributed training jobs. Every /v1 route needs "
                              "'Authorization: Bearer <token>'.")
    app.state.logs = logs
    app.state.store, app.state.backend, app.state.loop, app.state.config = store, backend, loop, config
    app.state.packages = packages  # a shipyard.packages.PackageStore; None: no code packages (tests)
    app.state.metrics = ServerMetrics(store)
    errors.install(app)

    app.add_middleware(LimitsAndMetrics, config=config, metrics=app.state.metrics)
    app.include_router(routes_jobs.router, prefix="/v1")
    app.include_router(routes_report.router, prefix="/v1")
    app.include_router(routes_packages.router, prefix="/v1")
    app.include_router(routes_admin.router, prefix="/v1")
    app.include_router(routes_ops.router)
    dashboard.install(app)
    routes_jobs._register_spec_schema(app)
    return app
