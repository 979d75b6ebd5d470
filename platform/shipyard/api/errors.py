"""Every error answer has one shape: ``{"error": {"status", "code", "message"}}``.

User errors (:class:`~shipyard.errors.UserError`) become 4xx with their message (which names the
field); ``NotFound`` is 404, conflicts and illegal state transitions 409, an invalid spec 422.
Anything else is a 500 whose details go to the server's log, not to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shipyard.errors import SpecError, UserError
from shipyard.scopes import ScopeError
from shipyard.store import Conflict, IllegalTransition, NotFound

log = logging.getLogger(__name__)

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 500: "internal",
         503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.code, self.headers = status, message, code or CODES.get(status, "error"), headers
        super().__init__(message)


def body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"status": status, "code": code or CODES.get(status, "error"), "message": message}}


def respond(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, code), status_code=status, headers=headers)


def status_of(e: UserError) -> tuple[int, str]:
    if isinstance(e, NotFound):
        return 404, "not_found"
    if isinstance(e, (Conflict, IllegalTransition)):
        return 409, "conflict"
    if isinstance(e, SpecError):
        return 422, "invalid_spec"
    if isinstance(e, ScopeError):
        return 403, "forbidden_storage"
    return 400, "bad_request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError):
        return respond(e.status, e.message, e.code, e.headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, e: UserError):
        status, code = status_of(e)
        return respond(status, str(e), code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{loc or 'request'}: {err.get('msg')}")
        return respond(422, "; ".join(parts) or "invalid request", "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return respond(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return respond(500, "internal server error (see the server's log)")
