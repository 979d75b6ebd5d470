"""Unauthenticated operational routes: ``/healthz`` (liveness plus store and backend reachability)
and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 when the store answers; says whether the backend does (a Ray head restarting is not
    a reason to restart the server)."""
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
    return JSONResponse({"status": "ok" if ok else "error", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
