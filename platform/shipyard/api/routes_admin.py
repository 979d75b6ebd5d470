"""``/v1/admin/tokens``: list, create and revoke bearer tokens; admin tokens only (a tenant's
token gets 403). The same store methods as ``shipyard admin list-tokens / create-token /
revoke-token``, which work on the database directly where the server's data is.

A revocation here drops this replica's token cache, so the token is refused from the next
request on; other replicas keep accepting it for up to :data:`~shipyard.api.auth.TOKEN_CACHE_S`
seconds (their caches are not told). Unlike the CLI, creating a token never creates its tenant:
an unknown tenant is a 404 (tenants are created with ``shipyard admin create-tenant``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from shipyard.api.auth import Principal, admin
from shipyard.store.records import Token
from shipyard.store.tenancy import MAX_LABEL, TokenState, check_tenant_name, token_lifetime, token_state

router = APIRouter(prefix="/admin", tags=["admin"])
Admin = Annotated[Principal, Depends(admin)]
TokenId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class TokenOut(BaseModel):
    """A token's record; never its secret."""

    id: int
    tenant: str
    role: Literal["user", "admin"]
    label: str | None = None
    created_at: datetime
    expires_at: datetime | None = None  # None: never expires
    revoked_at: datetime | None = None
    state: TokenState

    @classmethod
    def of(cls, t: Token) -> "TokenOut":
        return cls(id=t.id, tenant=t.tenant, role="admin" if t.admin else "user", label=t.label,
                   created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at, state=token_state(t))


class TokenList(BaseModel):
    items: list[TokenOut]
    next_after: int | None = None  # pass back as ``after`` for the next page; None: the last page


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(max_length=63)
    role: Literal["user", "admin"] = "user"
    label: str | None = Field(None, max_length=MAX_LABEL, description="a note: who holds it")
    expires_in: str | None = Field(None, max_length=16, description="90d, 12h or 30m (at most 3650d); "
                                                                    "null: never expires")


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown in this answer only, never again")


@router.get("/tokens", response_model=TokenList)
def list_tokens(request: Request, who: Admin,
                tenant: Annotated[str | None, Query(max_length=63, description="only this tenant's tokens")] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                after: Annotated[int, Query(ge=0, le=2**63 - 1, description="ids above this one")] = 0) -> TokenList:
    """Oldest first, revoked and expired ones included (``state`` says which)."""
    store = request.app.state.store
    if tenant is not None:
        check_tenant_name(tenant, "tenant")
        store.get_tenant(tenant)  # an unknown one is a 404, not an empty list that hides a typo
    items = store.list_tokens(tenant, limit=limit + 1, after=after)
    more = len(items) > limit
    items = items[:limit]
    return TokenList(items=[TokenOut.of(t) for t in items], next_after=items[-1].id if more else None)


@router.post("/tokens", status_code=201, response_model=TokenCreated)
def create_token(request: Request, who: Admin, body: TokenCreate) -> TokenCreated:
    """Create a token for an existing tenant; the answer holds its secret, once."""
    check_tenant_name(body.tenant, "tenant")
    expires_in = None if body.expires_in is None else token_lifetime(body.expires_in)
    secret, t = request.app.state.store.create_token(body.tenant, admin=body.role == "admin", label=body.label,
                                                     expires_in=expires_in)
    return TokenCreated(**TokenOut.of(t).model_dump(), token=secret)


@router.post("/tokens/{token_id}/revoke", response_model=TokenOut)
def revoke_token(request: Request, who: Admin, token_id: TokenId) -> TokenOut:
    """Revoke a token: refused by this replica from the next request, by the others within
    ``TOKEN_CACHE_S`` (5 s). Revoking a revoked token is a no-op that answers its record."""
    return TokenOut.of(request.app.state.store.revoke_token(token_id))
