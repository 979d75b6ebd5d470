"""Operational routes: ``/healthz`` (liveness plus store and backend reachability) and ``/metrics``
(Prometheus text format). Both answer without a token; ``/metrics`` then holds only aggregate
series (requests, jobs per state, scheduler ticks). The per-job series (``shipyard_job_*``: job
ids, names, tenants, losses) are added only for a scrape that presents an admin token, so one
tenant cannot read what another runs."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shipyard.api.auth import principal

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 when the store answers; says whether the backend does (a Ray head restarting is not
    a reason to restart the server), and whether this replica runs the scheduler (``leader``) or
    serves the API while another one does (``standby``)."""
    checks: dict[str, str] = {}
    try:
        request.app.state.store.count_jobs()
        checks["store"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["store"] = f"error: {e}"
    backend = request.app.state.backend
    if backend is not None:
        try:
            backend.capacity()
            checks["backend"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["backend"] = f"error: {e}"
    ok = checks["store"] == "ok"
    body = {"status": "ok" if ok else "error", "checks": checks}
    loop = request.app.state.loop
    if loop is not None:
        body["scheduler"] = "leader" if loop.leadership.held else "standby"
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    text = await run_in_threadpool(generate_latest, m.registry)
    if request.headers.get("authorization") and (await principal(request)).admin:
        text += await run_in_threadpool(generate_latest, m.jobs_registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
