"""The scheduler lock (shipyard.scheduler.leader) on a real SQLite file (flock) and a real
PostgreSQL server (advisory lock): one holder at a time, and a takeover when the holder dies."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from sqlalchemy.engine import make_url

from shipyard.scheduler import leader
from shipyard.store.engine import normalize_url

pytestmark = pytest.mark.integration

# A holder in another process: takes the lock, says so, then waits to be killed.
HOLD = """
import sys, time
from sqlalchemy.engine import make_url
from shipyard.scheduler import leader
from shipyard.store.engine import normalize_url
lock = leader.for_store(make_url(normalize_url(sys.argv[1])), sys.argv[2])
print("held" if lock.try_acquire() else "refused", flush=True)
time.sleep(600)
"""


def lock_for(url: str, data_dir) -> leader.Leadership:
    return leader.for_store(make_url(normalize_url(url)), data_dir)


def test_one_holder_at_a_time_and_a_standby_takes_over_when_the_holder_dies(fresh_database_url, tmp_path):
    a, b = lock_for(fresh_database_url, tmp_path), lock_for(fresh_database_url, tmp_path)
    try:
        assert (a.try_acquire(), b.try_acquire()) == (True, False)
        assert (a.try_acquire(), b.try_acquire()) == (True, False)  # confirmed, not re-taken
        assert (a.held, b.held) == (True, False)
        a.release()
        assert (b.try_acquire(), a.try_acquire()) == (True, False)
        b.release()

        holder = subprocess.Popen([sys.executable, "-c", HOLD, fresh_database_url, str(tmp_path)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert not a.try_acquire()
        finally:
            holder.kill()  # as kill -9: no release, the session (or the file) just closes
            holder.wait(10)
        t0 = time.monotonic()
        while not a.try_acquire():
            assert time.monotonic() - t0 < 5, "the lock was not free 5 s after its holder died"
            time.sleep(0.2)
    finally:
        a.release()
        b.release()


def test_a_holder_whose_postgresql_session_is_dropped_stops_holding(fresh_database_url, tmp_path):
    if fresh_database_url.startswith("sqlite"):
        pytest.skip("a flock cannot be taken away from a live process")
    import psycopg

    a, b = lock_for(fresh_database_url, tmp_path), lock_for(fresh_database_url, tmp_path)
    try:
        assert a.try_acquire() and not b.try_acquire()
        conninfo = make_url(normalize_url(fresh_database_url)).set(drivername="postgresql")
        with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'shipyard-scheduler-lock' AND pid = %s", (a._conn.info.backend_pid,))
        assert not a.try_acquire()  # its next check notices: it schedules no more
        assert b.try_acquire()
    finally:
        a.release()
        b.release()
