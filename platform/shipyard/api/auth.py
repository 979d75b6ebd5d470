"""Bearer tokens -> who is asking.

Users and admins present a token created with ``shipyard admin create-token`` (stored hashed,
mapped to a tenant and a role). A user sees and acts on its tenant's jobs only: another tenant's
job answers 404, exactly like a job that does not exist, so ids do not leak. An admin sees all.

A job's driver reports progress with a *report token*: an HMAC of the job id and the run (the
backend submission) under the server's report key (kept in the data directory, or
``SHIPYARD_REPORT_KEY``). It authorises posting that one run's reports and nothing else, and
lives as long as the run is the job's current one (the report route drops a stale run's
reports); the server derives it instead of storing it, so a restarted server still accepts the
reports of runs submitted before it died.

With auth off (``shipyard server --no-auth``, single-user local mode) every request acts as an
admin of the ``default`` tenant.

A valid token's record is reused for up to :data:`TOKEN_CACHE_S` seconds (the store's cache,
see :mod:`shipyard.store.tenancy`): a submit then costs no database read for its caller and no
hop to a worker thread. A token revoked through this server (``POST /v1/admin/tokens/ID/revoke``)
stops working at once here; one revoked through another replica, or by ``shipyard admin
revoke-token`` (which writes the database directly), stops within :data:`TOKEN_CACHE_S`. An
expired token stops at its ``expires_at`` everywhere: the cache checks it on every hit.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from shipyard.api.errors import ApiError
from shipyard.store.tenancy import hash_token

DEFAULT_TENANT = "default"
REPORT_PREFIX = "shr_"
TOKEN_CACHE_S = 5.0


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool

    def scope(self) -> str | None:
        """The tenant filter for store reads: None (everything) for admins."""
        return None if self.admin else self.tenant


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>' (shipyard admin "
                            "create-token makes one; the CLI reads SHIPYARD_TOKEN)",
                       headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401."""
    cfg = request.app.state.config
    if not cfg.auth:
        return Principal(DEFAULT_TENANT, True)
    secret, store = bearer(request), request.app.state.store
    record = store.cached_token(hash_token(secret), TOKEN_CACHE_S)
    if record is None:
        record = await run_in_threadpool(store.authenticate, secret, max_age_s=TOKEN_CACHE_S)
    if record is None:
        raise ApiError(401, "invalid or revoked token, or an expired one: ask an admin for a new "
                            "one (shipyard admin create-token)", headers={"WWW-Authenticate": "Bearer"})
    return Principal(record.tenant, record.admin)


async def admin(request: Request) -> Principal:
    """FastAPI dependency: an admin caller, or 401 (no valid token) / 403 (a tenant's token)."""
    who = await principal(request)
    if not who.admin:
        raise ApiError(403, "this route needs an admin token (shipyard admin create-token --role admin)")
    return who


def report_token(key: bytes, job_id: str, run: str) -> str:
    """The token of one run of one job: ``shr_<run>.<HMAC(job id, run)>``. It names its run, so the
    server checks it before reading a byte of the report, and a report for any other run (a
    requeued job's previous one, another job's) is refused."""
    mac = hmac.new(key, f"{job_id}\n{run}".encode(), hashlib.sha256).hexdigest()
    return f"{REPORT_PREFIX}{run}.{mac}"


def check_report_token(request: Request, job_id: str) -> str:
    """The run the request's report token is for, or 403."""
    token = bearer(request)
    run, _, _ = token.removeprefix(REPORT_PREFIX).rpartition(".")
    if not (token.startswith(REPORT_PREFIX) and run and len(run) <= 200
            and hmac.compare_digest(token, report_token(request.app.state.config.report_key, job_id, run))):
        raise ApiError(403, f"this token may not report for job {job_id}")
    return run
