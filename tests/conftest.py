"""Session-wide real services: one moto S3 server over HTTP and one Ray head, both on 127.0.0.1.

Tests that claim S3 behaviour talk to the moto server through s3fs/botocore over HTTP, as
s3fs's own test suite does; nothing is patched in-process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY_CPUS = 4  # logical CPUs; Ray resources are not pinned to cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in its own process; AWS_* and SHIPYARD_S3_ENDPOINT point at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "SHIPYARD_S3_ENDPOINT": endpoint,
        })
        os.environ.pop("AWS_PROFILE", None)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket for one test; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def stop_ray_node(proc: subprocess.Popen, sig: int = signal.SIGTERM, address: str | None = None) -> None:
    """Stop a `ray start --block` started in its own process group: ``sig``, then SIGKILL for
    whatever is left after 5 s (its raylet and workers can take 30 s to notice). ``address``: a
    head's, whose record in /tmp/ray/ray_current_cluster is removed as `ray stop` would (a stale
    one sends the State API of every later local cluster to a dead address)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    current = Path("/tmp/ray/ray_current_cluster")
    # Ray writes the machine's IP there, whatever --node-ip-address said: compare the GCS port.
    if address and current.exists() and current.read_text().strip().rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1]:
        current.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One Ray head for the whole session, started like a user's cluster (`ray start --head`).

    `--block` keeps the head's launcher in the foreground, so teardown stops this cluster only
    (`ray stop` would stop every Ray cluster on the machine, including another test session's).
    """
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # The dashboard agent's port too: Ray's default (52365) is held by any other head on the
    # machine, and a head whose agent failed to bind refuses every Jobs API submission.
    port, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--num-cpus={RAY_CPUS}",
                             "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                             "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout=60)
        wait_for_port(dash, timeout=60)
        yield address
    finally:
        stop_ray_node(proc, address=address)
        log.close()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as local shards of 300 rows, written once per session by the real
    `shipyard data shard`: ``<dir>/train`` (1,438 rows) and ``<dir>/test``."""
    data = tmp_path_factory.mktemp("digits")
    exe = Path(sys.executable).parent / "shipyard"
    for split in ("train", "test"):
        subprocess.run([str(exe), "data", "shard", f"sklearn:digits:{split}", str(data / split),
                        "--rows-per-shard", "300"], check=True, capture_output=True)
    return data


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the `shipyard` command as a subprocess."""
    env = {**os.environ, "SHIPYARD_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def shipyard(cli_env):
    """Run the installed `shipyard` command; returns the CompletedProcess (text output)."""
    exe = Path(sys.executable).parent / "shipyard"

    def run(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path = REPO):
        return subprocess.run([str(exe), *args], env={**cli_env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    return run


# -- databases for the store (SQLite file, and a real PostgreSQL) ------------------------------

def _postgres_installed() -> bool:
    import glob

    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    """A database for the session, once per backend: a SQLite file, and a real PostgreSQL server
    started by deploy/postgres.sh (or the one at SHIPYARD_TEST_DATABASE_URL). PostgreSQL is
    skipped only where it is not installed and CI is not set; under CI its absence fails."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'shipyard.db'}"
        return
    if os.environ.get("SHIPYARD_TEST_DATABASE_URL"):
        yield os.environ["SHIPYARD_TEST_DATABASE_URL"]
        return
    if not _postgres_installed() and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin); deploy/postgres.sh installs it")
    import tempfile

    # Not under pytest's private temp dir: as root the server runs as the `postgres` user,
    # which must be able to reach its directory.
    base = Path(tempfile.mkdtemp(prefix="shipyard-pg-"))
    base.chmod(0o755)
    script = REPO / "deploy" / "postgres.sh"
    try:
        r = subprocess.run(["bash", str(script), str(base / "pg")], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"deploy/postgres.sh failed (exit {r.returncode}):\n{r.stderr}", pytrace=False)
        yield r.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", str(base / "pg")], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_database_url(database_url, tmp_path):
    """An empty database of the session's kind for one test (dropped afterwards)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'shipyard.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
