"""Tenants (teams with quotas) and their bearer tokens; mixed into :class:`~shipyard.store.Store`.

A token is shown once, when created; the store keeps its SHA-256 only, so a leaked database
does not leak working tokens. Looking a token up is one indexed equality on that hash.

The API authenticates every request, so it may accept an answer at most ``max_age_s`` old from a
small in-process cache (:meth:`TenancyMixin.authenticate`), which saves a database read per
request. Only valid tokens are cached (an unknown or revoked one always reaches the database,
so a token created by another process works at once). A revocation or tenant deletion through
this store drops the cache at once; one made by another process (``shipyard admin`` on the same
database) takes effect within ``max_age_s``. Expiry needs no invalidation: a cached token's
``expires_at`` is compared with the clock on every hit.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from shipyard.errors import UserError
from shipyard.store import models
from shipyard.store.errors import NotFound, TenantExists, TenantInUse, TenantNotFound
from shipyard.store.records import Tenant, Token

TOKEN_PREFIX = "shp_"
_TENANT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_UNSET: object = object()
_DURATION = re.compile(r"^(?P<n>[0-9]{1,7})(?P<unit>[dhm])$")
_UNIT_S = {"d": 86_400, "h": 3_600, "m": 60}
MAX_TOKEN_DAYS = 3650
MAX_LABEL = 200  # the column's width
TokenState = Literal["active", "revoked", "expired"]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def check_tenant_name(name: str, field: str = "tenant name") -> None:
    if not _TENANT.match(name):
        raise UserError(f"{field}: got {name[:80]!r}; must be lower-case letters, digits and '-', "
                        "at most 63 characters")


def token_lifetime(text: str, field: str = "expires_in") -> timedelta:
    """``90d``, ``12h`` or ``30m`` as a timedelta, from 1 minute to :data:`MAX_TOKEN_DAYS` days;
    ``field`` names the option in the error (``--expires-in`` for the CLI)."""
    m = _DURATION.match(text.strip())
    seconds = int(m["n"]) * _UNIT_S[m["unit"]] if m else 0
    if not 60 <= seconds <= MAX_TOKEN_DAYS * 86_400:
        raise UserError(f"{field}: got {text[:40]!r}; expected a whole number of days, hours or minutes "
                        f"(e.g. 90d, 12h, 30m), at least 1m and at most {MAX_TOKEN_DAYS}d")
    return timedelta(seconds=seconds)


def check_label(label: str | None, field: str = "label") -> None:
    if label is not None and (len(label) > MAX_LABEL or not label.isprintable()):
        raise UserError(f"{field}: must be printable text of at most {MAX_LABEL} characters")


def _no_token(token_id: int) -> NotFound:
    return NotFound(f"no token with id {token_id} (shipyard admin list-tokens shows them)")


def token_state(token: Token, now: datetime | None = None) -> TokenState:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= (now or _now()):
        return "expired"
    return "active"


def _check_quota(field: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise UserError(f"{field}: got {value}; must be >= 0, or unset for no limit")


def _check_priority(priority: int) -> None:
    if not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise UserError(f"priority: got {priority!r}; must be an integer from -1000 to 1000")


def _roots(roots) -> list[dict]:
    """Validated ``[{"uri", "writable"}]`` (a root must be a well-formed s3:// or absolute local URI)."""
    from shipyard.scopes import normalise

    out = []
    for uri, writable in roots:
        out.append({"uri": normalise(uri, "--storage-root", allow_local=True), "writable": bool(writable)})
    if len(out) > 64:
        raise UserError(f"storage roots: got {len(out)}; at most 64 per tenant")
    return out


CACHE_MAX = 10_000  # distinct valid tokens remembered; past it the cache starts over


class TokenCache:
    """Valid tokens read from the database, with when they were read; one per store."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Token]] = {}
        self.generation = 0  # bumped by every forget: a read begun before it is not cached
        self._lock = threading.Lock()

    def get(self, digest: str, max_age_s: float) -> Token | None:
        hit = self._entries.get(digest)
        if hit is None or time.monotonic() - hit[0] > max_age_s:
            return None
        return hit[1]

    def put(self, digest: str, token: Token, read_at: float, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                if len(self._entries) >= CACHE_MAX:
                    self._entries = {}
                self._entries[digest] = (read_at, token)

    def forget(self) -> None:
        with self._lock:
            self._entries = {}
            self.generation += 1


class TenancyMixin:
    """Needs ``self._read()`` and ``self._write()`` session context managers and a
    ``self._tokens`` :class:`TokenCache` (see Store)."""

    _tokens: TokenCache

    def _forget_tokens(self) -> None:
        self._tokens.forget()

    def create_tenant(self, name: str, *, max_gpus: float | None = None, max_cpus: float | None = None,
                      max_running_jobs: int | None = None, storage_roots: list[tuple[str, bool]] = (),
                      priority: int = 0, exist_ok: bool = False) -> Tenant:
        """``storage_roots``: ``(uri, writable)`` prefixes the tenant's jobs may use besides the
        server's default root for it; ``priority``: see :meth:`set_priority`."""
        check_tenant_name(name)
        for field, v in (("max_gpus", max_gpus), ("max_cpus", max_cpus), ("max_running_jobs", max_running_jobs)):
            _check_quota(field, v)
        _check_priority(priority)
        row = models.Tenant(name=name, max_gpus=max_gpus, max_cpus=max_cpus, max_running_jobs=max_running_jobs,
                            created_at=datetime.now(timezone.utc), storage_roots=_roots(storage_roots),
                            priority=priority)
        try:
            with self._write() as s:
                s.add(row)
        except IntegrityError:
            if exist_ok:
                return self.get_tenant(name)
            raise TenantExists(name) from None
        return Tenant.of(row)

    def get_tenant(self, name: str) -> Tenant:
        with self._read() as s:
            row = s.get(models.Tenant, name)
        if row is None:
            raise TenantNotFound(name)
        return Tenant.of(row)

    def list_tenants(self) -> list[Tenant]:
        with self._read() as s:
            return [Tenant.of(r) for r in s.scalars(select(models.Tenant).order_by(models.Tenant.name))]

    def set_quotas(self, name: str, *, max_gpus=_UNSET, max_cpus=_UNSET, max_running_jobs=_UNSET) -> Tenant:
        """Change some quotas (``None`` removes a limit; an omitted one is kept). Running jobs
        are not stopped by a lower quota; new admissions respect it."""
        changes = {k: v for k, v in (("max_gpus", max_gpus), ("max_cpus", max_cpus),
                                      ("max_running_jobs", max_running_jobs)) if v is not _UNSET}
        for field, v in changes.items():
            _check_quota(field, v)
        return self._update_tenant(name, **changes)

    def set_storage(self, name: str, storage_roots: list[tuple[str, bool]]) -> Tenant:
        """Replace the tenant's granted storage roots (``(uri, writable)``)."""
        return self._update_tenant(name, storage_roots=_roots(storage_roots))

    def set_priority(self, name: str, priority: int) -> Tenant:
        """The tenant's priority: a job may preempt another tenant's job only when its own
        tenant's priority is higher (a job's ``priority`` orders its tenant's queue)."""
        _check_priority(priority)
        return self._update_tenant(name, priority=priority)

    def _update_tenant(self, name: str, **changes) -> Tenant:
        with self._write() as s:
            row = s.get(models.Tenant, name)
            if row is None:
                raise TenantNotFound(name)
            for field, v in changes.items():
                setattr(row, field, v)
            return Tenant.of(row)

    def delete_tenant(self, name: str) -> None:
        """Delete a tenant and its tokens; refused while any of its jobs is on record."""
        with self._write() as s:
            row = s.get(models.Tenant, name)
            if row is None:
                raise TenantNotFound(name)
            if s.scalar(select(models.Job.seq).where(models.Job.tenant == name).limit(1)) is not None:
                raise TenantInUse(name)
            s.execute(delete(models.Token).where(models.Token.tenant == name))
            s.execute(delete(models.Tenant).where(models.Tenant.name == name))
        self._forget_tokens()

    def create_token(self, tenant: str, *, admin: bool = False, label: str | None = None,
                     expires_in: timedelta | None = None) -> tuple[str, Token]:
        """Returns ``(secret, record)``; the secret is never retrievable again. ``expires_in``
        (see :func:`token_lifetime` for the bounds): after it the token is refused like a revoked
        one; ``None`` never expires."""
        check_label(label)
        if expires_in is not None and not timedelta(minutes=1) <= expires_in <= timedelta(days=MAX_TOKEN_DAYS):
            raise UserError(f"expires_in: got {expires_in}; must be from 1 minute to {MAX_TOKEN_DAYS} days")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = _now()
        row = models.Token(token_hash=hash_token(secret), tenant=tenant, admin=admin, label=label,
                           created_at=now, expires_at=None if expires_in is None else now + expires_in)
        with self._write() as s:
            if s.get(models.Tenant, tenant) is None:
                raise TenantNotFound(tenant)
            s.add(row)
        return secret, Token.of(row)

    def register_token(self, secret: str, tenant: str, *, admin: bool = False, label: str | None = None) -> Token:
        """Store a secret chosen elsewhere (``SHIPYARD_ADMIN_TOKEN``); a no-op if it is stored already."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) < len(TOKEN_PREFIX) + 20:
            raise UserError(f"token: must start with {TOKEN_PREFIX!r} and hold at least 20 more characters "
                            "(shipyard admin create-token makes one)")
        existing = self.authenticate(secret)
        if existing is not None:
            return existing
        row = models.Token(token_hash=hash_token(secret), tenant=tenant, admin=admin, label=label,
                           created_at=datetime.now(timezone.utc))
        with self._write() as s:
            if s.get(models.Tenant, tenant) is None:
                raise TenantNotFound(tenant)
            s.add(row)
        return Token.of(row)

    def authenticate(self, secret: str, *, max_age_s: float = 0.0) -> Token | None:
        """The token record for a bearer secret, or ``None`` if unknown, revoked or expired. With
        ``max_age_s``, a valid answer read from the database at most that long ago may be reused."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        digest = hash_token(secret)
        if max_age_s > 0:
            hit = self.cached_token(digest, max_age_s)
            if hit is not None:
                return hit
        read_at, generation = time.monotonic(), self._tokens.generation
        with self._read() as s:
            row = s.scalar(select(models.Token).where(models.Token.token_hash == digest))
        if row is None:
            return None
        token = Token.of(row)
        if token_state(token) != "active":
            return None
        self._tokens.put(digest, token, read_at, generation)
        return token

    def cached_token(self, digest: str, max_age_s: float) -> Token | None:
        """A valid token's record from the cache if read at most ``max_age_s`` ago and not expired
        since (no I/O: the API calls it on its event loop and goes to a thread only on a miss)."""
        hit = self._tokens.get(digest, max_age_s)
        if hit is not None and hit.expires_at is not None and hit.expires_at <= _now():
            return None
        return hit

    def list_tokens(self, tenant: str | None = None, *, limit: int | None = None, after: int = 0) -> list[Token]:
        """Oldest first; ``after``: only ids above it (the next page starts after the last id seen)."""
        q = select(models.Token).where(models.Token.id > after).order_by(models.Token.id).limit(limit)
        if tenant is not None:
            q = q.where(models.Token.tenant == tenant)
        with self._read() as s:
            return [Token.of(r) for r in s.scalars(q)]

    def get_token(self, token_id: int) -> Token:
        with self._read() as s:
            row = s.get(models.Token, token_id) if 0 < token_id < 2**63 else None
            if row is None:
                raise _no_token(token_id)
            return Token.of(row)

    def revoke_token(self, token_id: int) -> Token:
        """Revoke a token (a no-op on one revoked already: its first ``revoked_at`` is kept)."""
        with self._write() as s:
            row = s.get(models.Token, token_id) if 0 < token_id < 2**63 else None
            if row is None:
                raise _no_token(token_id)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(timezone.utc)
            token = Token.of(row)
        self._forget_tokens()
        return token
