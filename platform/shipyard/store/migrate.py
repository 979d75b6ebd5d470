"""Bring a database to the newest schema, programmatically, whenever a store opens.

No alembic.ini is involved: the script location is this package's ``migrations/`` folder and
the connection is handed to ``env.py`` directly. Opening twice is a no-op (Alembic compares
``alembic_version`` with the head). Two processes opening one empty database at once (the
server and ``shipyard admin create-token``) are serialised: on PostgreSQL by a transaction-level
advisory lock, on SQLite by the store's ``BEGIN IMMEDIATE`` write transactions.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine

from shipyard.errors import UserError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK_KEY = 0x5348_4950  # "SHIP": any constant shared by every shipyard process


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Apply every migration not yet applied; returns the revision the database is now at."""
    head = head_revision()
    if current_revision(engine) == head:
        return head
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        cfg.attributes["connection"] = conn
        try:
            command.upgrade(cfg, "head")
        except CommandError as e:
            # A database written by a newer shipyard: its revision is unknown here.
            raise UserError(f"database {engine.url.render_as_string(hide_password=True)}: "
                            f"schema revision unknown to this shipyard ({e}); upgrade shipyard") from None
    return head
