"""Running one step of the GPU proof: a subprocess in a session of its own, killed whole at its timeout.

A step's command may start a tree of processes (``shipyard run`` starts a private Ray: GCS,
raylet, workers). They share the step's process group (Ray's daemons are fate-shared with the
driver, in its group), so one ``killpg`` ends all of them and nothing outside the step.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ran:
    rc: int | None  # None: killed at its timeout
    text: str       # stdout and stderr, interleaved
    seconds: float

    def failure(self, timeout_s: float) -> str | None:
        if self.rc is None:
            return f"timed out after {timeout_s:.0f}s"
        return None if self.rc == 0 else f"exit status {self.rc}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_group(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float, scratch: Path) -> Ran:
    """Run ``argv`` to its end or ``timeout_s``; either way, end whatever it left in its group."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+", dir=scratch) as buf:  # a file: a pipe could fill and block it
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=buf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        kill_group(proc)
        buf.seek(0)
        text = buf.read()
    return Ran(rc, text, time.monotonic() - t0)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM whatever is left in ``proc``'s process group, then SIGKILL what is still there 10 s
    later. ``proc`` leads a session of its own, so nothing else is hit."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never looks empty
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)
