"""Which server process runs the scheduler loop: exactly one per store.

Two loops over one store would both see the same free capacity and admit into it, so every
replica serves the API but only the holder of a lock schedules:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) taken on a connection of
  its own, outside the store's pool. The lock lives as long as that session: when the holder dies
  (``kill -9``, a lost node), its connection closes and PostgreSQL releases the lock; a standby,
  retrying every :data:`RETRY_S`, takes over. TCP keepalives are set on both ends so that a holder
  that vanished without closing its socket is dropped within about 15 s. The URL must reach
  PostgreSQL itself or a session-mode pool: a transaction-mode pooler (PgBouncer's default for
  many setups) cannot hold a session lock.
- SQLite: the store is a file on one machine, so the lock is an exclusive ``flock`` on a file
  next to it; the kernel releases it when the holder exits, however it exits.

The holder checks the lock before every tick (:meth:`Leadership.try_acquire` pings its
connection), so a holder whose session was dropped stops scheduling at its next tick.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
RETRY_S = 2.0  # how often a standby tries to take the lock
# One 64-bit key for "the scheduler of this database" (advisory locks are per database).
LOCK_KEY = int.from_bytes(hashlib.sha256(b"shipyard.scheduler").digest()[:8], "big", signed=True)


class Leadership(Protocol):
    def try_acquire(self) -> bool:
        """Take the lock if it is free, or confirm it is still held; True while this process holds it."""

    @property
    def held(self) -> bool:
        """The answer of the last :meth:`try_acquire` (no I/O: for ``/healthz``)."""

    def release(self) -> None:
        """Give the lock up (a standby takes it at its next try)."""

    def describe(self) -> str:
        """What the lock is, for the log."""


class Sole:
    """The only scheduler there can be (tests, or a caller that guarantees it)."""

    held = True

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def describe(self) -> str:
        return "sole scheduler"


class FileLeadership:
    """An exclusive, non-blocking ``flock`` on ``path``, held while the file stays open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def describe(self) -> str:
        return f"flock on {self.path}"


class PostgresLeadership:
    """``pg_try_advisory_lock(LOCK_KEY)`` on a dedicated autocommit connection. A standby keeps
    its connection open between tries (one idle session per replica, not a connect every 2 s)."""

    def __init__(self, conninfo: str, key: int = LOCK_KEY, connect_timeout_s: int = 5):
        self.conninfo, self.key, self.connect_timeout_s = conninfo, key, connect_timeout_s
        self._conn = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def _connect(self):
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout_s,
                               keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                               application_name="shipyard-scheduler-lock")
        # The server side of the keepalive (a holder that vanished), and no idle timeout for a
        # session that is idle by design; a server too old for a setting just keeps its default.
        for setting in ("tcp_keepalives_idle = 5", "tcp_keepalives_interval = 2", "tcp_keepalives_count = 3",
                        "idle_session_timeout = 0"):
            try:
                conn.execute(f"SET {setting}")
            except psycopg.Error:
                pass
        return conn

    def try_acquire(self) -> bool:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._held = False
                self._conn = self._connect()
            if self._held:
                self._conn.execute("SELECT 1")  # the session (and so the lock) is still there
            else:
                self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
        except psycopg.Error as e:
            if self._held:
                log.warning("scheduler lock: lost the connection that held it (%s)", e)
            self._drop()
        return self._held

    def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone either way
                pass

    def release(self) -> None:
        """Unlock, then close. Closing alone would release the lock too, but only once the server
        has processed the disconnect, after this returns; the unlock is done when it returns."""
        import psycopg

        if self._held and self._conn is not None:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except psycopg.Error:
                pass  # the session is gone, and its lock with it
        self._drop()

    def describe(self) -> str:
        return f"PostgreSQL advisory lock {self.key}"


def for_store(engine_url, data_dir: Path) -> Leadership:
    """The lock for a store's database: ``engine_url`` is the store's SQLAlchemy URL."""
    if engine_url.get_backend_name() == "postgresql":
        return PostgresLeadership(engine_url.set(drivername="postgresql").render_as_string(hide_password=False))
    if engine_url.database:
        return FileLeadership(Path(engine_url.database + ".scheduler-lock"))
    return FileLeadership(Path(data_dir) / "scheduler.lock")
