"""Bearer tokens -> who is asking.

Users and admins present a token created with ``shipyard admin create-token`` (stored hashed,
mapped to a tenant and a role). A user sees and acts on its tenant's jobs only: another tenant's
job answers 404, exactly like a job that does not exist, so ids do not leak. An admin sees all.

A job's driver reports progress with a *report token*: an HMAC of the job id under the server's
report key (kept in the data directory, or ``SHIPYARD_REPORT_KEY``). It authorises posting that
one job's reports and nothing else; the server derives it instead of storing it, so a restarted
server still accepts the reports of runs submitted before it died.

With auth off (``shipyard server --no-auth``, single-user local mode) every request acts as an
admin of the ``default`` tenant.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from shipyard.api.errors import ApiError

DEFAULT_TENANT = "default"
REPORT_PREFIX = "shr_"


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


def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401."""
    cfg = request.app.state.config
    if not cfg.auth:
        return Principal(DEFAULT_TENANT, True)
    record = request.app.state.store.authenticate(bearer(request))
    if record is None:
        raise ApiError(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return Principal(record.tenant, record.admin)


def report_token(key: bytes, job_id: str) -> str:
    return REPORT_PREFIX + hmac.new(key, job_id.encode(), hashlib.sha256).hexdigest()


def check_report_token(request: Request, job_id: str) -> None:
    token = bearer(request)
    if not hmac.compare_digest(token, report_token(request.app.state.config.report_key, job_id)):
        raise ApiError(403, f"this token may not report for job {job_id}")
