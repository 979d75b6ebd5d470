"""The FastAPI application: configuration, middleware, error shape, routers.

``create_app(store, backend, loop, config)``: ``backend`` and ``loop`` may be None (the API then
stores and lists jobs but has no logs, and nothing schedules them), which is how the unit tests
run it over SQLite alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI, Request

from shipyard.api import dashboard, errors, routes_jobs, routes_ops, routes_report
from shipyard.api.metrics import ServerMetrics

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ApiConfig:
    auth: bool = True
    report_key: bytes = b"unset"
    max_user_priority: int = 100  # priorities above this need an admin token
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(store, backend=None, loop=None, config: ApiConfig = ApiConfig()) -> FastAPI:
    from shipyard import __version__

    app = FastAPI(title="shipyard", version=__version__, openapi_url="/openapi.json",
                  description="Submit, watch and cancel distributed training jobs. Every /v1 route needs "
                              "'Authorization: Bearer <token>'.")
    app.state.store, app.state.backend, app.state.loop, app.state.config = store, backend, loop, config
    app.state.metrics = ServerMetrics(store)
    errors.install(app)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        length = request.headers.get("content-length")
        # Driver reports carry metric points buffered while the server was away: a larger cap.
        limit = config.max_body_bytes * (16 if request.url.path.endswith("/report") else 1)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return errors.respond(413, f"request body larger than {limit} bytes")
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        m = app.state.metrics
        m.requests.labels(request.method, route, f"{response.status_code // 100}xx").inc()
        m.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    app.include_router(routes_jobs.router, prefix="/v1")
    app.include_router(routes_report.router, prefix="/v1")
    app.include_router(routes_ops.router)
    dashboard.install(app)
    routes_jobs._register_spec_schema(app)
    return app
