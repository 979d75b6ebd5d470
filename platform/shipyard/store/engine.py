"""Database URL -> SQLAlchemy engine, with the settings that make concurrent writers safe.

SQLite (the embedded default) is one file shared by the API threads and the scheduler loop:

- WAL journal, so readers never wait for the writer and the writer never waits for readers;
- ``BEGIN IMMEDIATE`` for write transactions, so a transaction takes the write lock before its
  first read. With the default deferred BEGIN, a transaction that reads then writes can fail at
  once with "database is locked" when another thread wrote in between (no busy wait helps
  there); with IMMEDIATE it simply waits up to ``busy_timeout``;
- foreign keys on (SQLite leaves them off by default).

PostgreSQL needs nothing special: every write is one short READ COMMITTED transaction whose
compare-and-set is a single ``UPDATE ... WHERE state = :expected``.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from shipyard.store.errors import StoreError

WRITE = "shipyard_write"  # execution option: this transaction will write
BUSY_TIMEOUT_MS = 30_000


def default_url(data_dir: str | Path) -> str:
    path = Path(data_dir).expanduser().resolve() / "shipyard.db"
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """Accept the URLs users write: ``postgresql://`` and ``postgres://`` mean psycopg 3 (the
    driver shipyard installs), not SQLAlchemy's default psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"database URL {url!r} is not a URL; expected sqlite:///PATH or "
                         "postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StoreError("database URL: an in-memory SQLite database would vanish with the "
                             "process; give a file, sqlite:///PATH")
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _sqlite_setup(engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise StoreError(f"database URL {parsed.render_as_string(hide_password=True)}: use the "
                             "psycopg 3 driver (postgresql+psycopg:// or postgresql://)")
        return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=16)
    raise StoreError(f"database URL {parsed.render_as_string(hide_password=True)}: unsupported "
                     "database; use sqlite:///PATH or postgresql://...")


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # synchronous stays FULL (an fsync of the WAL per commit): a job the API acknowledged
        # must survive a power cut too, not only a crash of this process (which NORMAL survives).
        # Concurrent submits share one commit (store/submits.py), so the fsync is paid per batch.
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")
