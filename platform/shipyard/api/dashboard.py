"""The web dashboard: ``/ui`` (job list) and ``/ui/jobs/{id}`` (one job), served by the API server.

The pages are static files (``api/static/``: one HTML shell, plain JS, CSS and the vendored uPlot
chart library), public like any login page: they hold no data. The browser fetches everything
from the ``/v1`` API with the user's bearer token, which the page asks for once and keeps in
``sessionStorage`` (gone when the tab closes, never in a cookie, so no CSRF surface and the same
tenant rules as the CLI). There is no build step and no front-end server: what is in ``static/``
is what runs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["dashboard"], include_in_schema=False)
NO_CACHE = {"Cache-Control": "no-cache"}  # a server upgrade must not leave a stale page running


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui")
@router.get("/ui/")
def job_list() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:  # noqa: ARG001 - the page reads the id from its URL
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


def install(app) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
