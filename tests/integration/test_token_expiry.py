"""Migration 0006 (``tokens.expires_at``) on a SQLite file and a PostgreSQL server: tokens made
before it keep working and never expire; after it an expired token is refused like a revoked
one, while its row stays listed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, update

from shipyard.store import Store
from shipyard.store.migrate import _config, current_revision, head_revision
from shipyard.store import models
from shipyard.store.models import Base
from shipyard.store.tenancy import token_state


def migrate(url: str, revision: str, *, down: bool = False) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
    finally:
        engine.dispose()


def columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("tokens")}
    finally:
        engine.dispose()


def test_a_token_made_before_the_migration_keeps_working_and_never_expires(fresh_database_url):
    migrate(fresh_database_url, "0005")
    assert "expires_at" not in columns(fresh_database_url)
    with Store.open(fresh_database_url) as store:  # opening applies 0006
        assert current_revision(store.engine) == head_revision()
        store.create_tenant("a")
        secret, tok = store.create_token("a", label="before")
    # Back to 0005 and up again, as an upgrade from an older shipyard does, with the row kept.
    migrate(fresh_database_url, "0005", down=True)
    assert "expires_at" not in columns(fresh_database_url)
    with Store.open(fresh_database_url) as store:
        assert "expires_at" in columns(fresh_database_url)
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        got = store.authenticate(secret)
        assert (got.id, got.label, got.expires_at) == (tok.id, "before", None) and token_state(got) == "active"


def test_an_expired_token_is_refused_and_still_listed(fresh_database_url):
    with Store.open(fresh_database_url) as store:
        store.create_tenant("a")
        secret, tok = store.create_token("a", expires_in=timedelta(days=3650))
        assert tok.expires_at - tok.created_at == timedelta(days=3650)
        assert store.authenticate(secret) == tok
        past = datetime.now(timezone.utc) - timedelta(seconds=1)
        with store.engine.begin() as conn:  # as if its time had come
            conn.execute(update(models.Token).where(models.Token.id == tok.id).values(expires_at=past))
        assert store.authenticate(secret) is None
        (listed,) = store.list_tokens("a")
        assert listed.expires_at == past and token_state(listed) == "expired"
