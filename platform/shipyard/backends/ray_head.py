"""The local Ray head that ``shipyard server`` starts when no ``--ray-address`` is given.

It runs ``ray start --head --block`` in a session of its own and records its pid and address in
``<data dir>/ray-head.json``. A server that restarts (even after ``kill -9``) finds the head still
running and joins it again, so the jobs on it keep running and are re-attached. A server that
exits (SIGTERM included) leaves the head running; it is stopped by ``shipyard server stop-head``
(:func:`stop_head`) or by a server run with ``--stop-head-on-exit``, by signalling that process
group (never ``ray stop``, which would stop every Ray cluster on the machine). Stopping it stops
every job on it without a preemption checkpoint.

Trust: a Ray cluster runs whatever its Jobs API or GCS is asked to, so the head is started with
token authentication always on (``RAY_AUTH_MODE=token``; the token is generated at first start
into ``<data dir>/ray-auth-token``, mode 0600, and the server's own Ray clients use it), its
dashboard and Jobs API on 127.0.0.1, and an environment holding nothing of the server's but
what a process needs to run (:data:`HEAD_ENV`): no AWS keys, no admin token, no database URL,
since every job's driver inherits the head's environment. Ray 2.60 has no option to bind the
GCS, the raylet or the Ray Client server to loopback (they listen on every interface); the token
is what refuses a caller from another address, and a firewall should keep those ports private.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


# What the head (and so every job's driver and workers) inherits from the server's environment.
HEAD_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV",
            "PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
TOKEN_FILE = "ray-auth-token"


def auth_env(data_dir: Path) -> dict[str, str]:
    """The variables that make a Ray process (the head, or a client of it) use the head's token;
    the token file is created (0600) on first use."""
    path = data_dir / TOKEN_FILE
    if not path.exists():
        import secrets

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@dataclass
class LocalHead:
    pid: int
    address: str
    started: bool  # by this server process (else: found running from an earlier one)
    client_port: int | None = None  # its Ray Client server (ray://127.0.0.1:<port>)

    def stop(self, timeout_s: float = 8) -> None:
        """SIGTERM to the head's process group (its jobs' drivers take it as a preemption notice),
        then SIGKILL for what is left after ``timeout_s``: ``ray start --block`` itself takes about
        30 s to exit on SIGTERM (its raylet drains), longer than a pod's grace period."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.2)
        if _alive(self.pid):
            os.killpg(self.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


RECORD = "ray-head.json"


def running_head(data_dir: Path) -> LocalHead | None:
    """The head recorded in the data dir, if its process is alive and its GCS port answers."""
    try:
        info = json.loads((data_dir / RECORD).read_text())
        if _alive(info["pid"]) and _listening(info["address"]):
            return LocalHead(info["pid"], info["address"], started=False, client_port=info.get("client_port"))
    except (ValueError, KeyError, TypeError, OSError):
        pass
    return None


def _is_ray_head(pid: int) -> bool:
    """Whether ``pid`` is still a ``ray start --head`` (a recorded pid may have been reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the alive + listening check must do
    return b"start" in argv and b"--head" in argv


def stop_head(data_dir: Path, timeout_s: float = 8) -> LocalHead | None:
    """Stop the head recorded in the data dir and forget it; None when none is running."""
    head = running_head(data_dir)
    if head is not None and _is_ray_head(head.pid):
        head.stop(timeout_s)
    else:
        head = None
    (data_dir / RECORD).unlink(missing_ok=True)
    return head


def ensure_head(data_dir: Path, num_cpus: float | None = None, timeout_s: float = 90) -> LocalHead:
    record = data_dir / RECORD
    head = running_head(data_dir)
    if head is not None:
        return head
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    port, dash, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    # The agent's port is chosen too: Ray's default (52365) is taken by any other head on the
    # machine, and a head without its agent refuses every job submission.
    cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
           f"--ray-client-server-port={client}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    log = open(data_dir / "ray-head.log", "ab")
    env = {k: v for k, v in os.environ.items() if k in HEAD_ENV}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, **auth_env(data_dir), "RAY_USAGE_STATS_ENABLED": "0"})
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not (_listening(address) and _listening(f"127.0.0.1:{dash}")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head did not start (see {data_dir / 'ray-head.log'})")
        time.sleep(0.3)
    record.write_text(json.dumps({"pid": proc.pid, "address": address, "client_port": client}))
    return LocalHead(proc.pid, address, started=True, client_port=client)
