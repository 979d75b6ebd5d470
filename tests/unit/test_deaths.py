"""What a user reads when a worker process dies without a Python error (runtime/deaths.py): the
kernel's own record of the pid says OOM killer, crash, or neither (then SIGKILL from someone).

The crash and the OOM kill are real: a child process segfaults, and another is OOM-killed by
the kernel inside a memory cgroup of its own with a 64 MiB limit (where this machine lets a test
make one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shipyard.run.records import RankProcess
from shipyard.runtime import deaths
from shipyard.runtime.attempts import describe_failure

KMSG = deaths.kernel_records() is not None
needs_kmsg = pytest.mark.skipif(not KMSG, reason="this machine's kernel log (/dev/kmsg) is not readable")

RECORDS = [
    (10.0, "python[4242]: segfault at 0 ip 00007f sp 00007ffd error 4 in libc.so.6"),
    (11.0, "Memory cgroup out of memory: Killed process 777 (python) total-vm:1000kB, anon-rss:900kB"),
    (12.0, "traps: python[888] trap divide error ip:4011 sp:7ffe error:0 in a.out"),
    (13.0, "Out of memory: Killed process 77 (ray::Worker) total-vm:1kB"),
]


def test_the_kernel_lines_for_a_pid_and_none_for_its_neighbours():
    assert deaths.find(RECORDS, 4242) == (False, "segfault")
    assert deaths.find(RECORDS, 777) == (True, None)
    assert deaths.find(RECORDS, 888) == (False, "trap divide error")
    assert deaths.find(RECORDS, 77) == (True, None) and deaths.find(RECORDS, 7) == (False, None)
    assert deaths.find(RECORDS, 777, since=11.5) == (False, None)  # before the process started: another's pid


def test_the_words_for_each_verdict():
    oom = deaths.explain(deaths.Witness(log_readable=True, oom_killed=True), 5)
    assert oom.startswith("worker process killed by the kernel's OOM killer (pid 5, from its node's kernel log)")
    # A container that may not read the kernel log still has its cgroup's count.
    assert "OOM killer (pid 5, from its memory cgroup" in deaths.explain(
        deaths.Witness(log_readable=False, cgroup_oom_kills=1), 5)
    assert deaths.explain(deaths.Witness(log_readable=True, crash="segfault"), 5).startswith(
        "worker process crashed: segfault (SIGSEGV, pid 5")
    assert deaths.explain(deaths.Witness(log_readable=True), 5).startswith("worker process killed by SIGKILL")
    for unknown in (None, deaths.Witness(log_readable=False)):
        assert "could not be read" in deaths.explain(unknown, 5)


def test_the_cause_of_an_attempt_uses_the_kernels_words():
    from ray.exceptions import ActorDiedError

    words = deaths.explain(deaths.Witness(log_readable=True, oom_killed=True), 5)
    f = describe_failure({0: RuntimeError("Connection closed by peer"), 1: ActorDiedError()}, step=9, deaths={1: words})
    assert f.cause == f"rank 1: {words}"[:len(f.cause)] and f.error is None


def test_memory_cgroup_reads_v1_and_v2_layouts(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "memory" / "pod" / "c").mkdir(parents=True)
    (v1 / "memory" / "pod" / "c" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (tmp_path / "cg1").write_text("4:memory:/pod/c\n1:cpu:/\n")
    assert deaths.memory_cgroup(tmp_path / "cg1", v1) == deaths.MemoryCgroup(str(v1 / "memory/pod/c"), 3)
    v2 = tmp_path / "v2"
    (v2 / "user.slice").mkdir(parents=True)
    (v2 / "user.slice" / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    (tmp_path / "cg2").write_text("0::/user.slice\n")
    assert deaths.memory_cgroup(tmp_path / "cg2", v2) == deaths.MemoryCgroup(str(v2 / "user.slice"), 1)
    (tmp_path / "cg3").write_text("0::/nowhere\n")
    assert deaths.memory_cgroup(tmp_path / "cg3", v2) is None


def _process(pid: int, started: float, cgroup: deaths.MemoryCgroup | None = None) -> RankProcess:
    return RankProcess(rank=0, pid=pid, node_ip="127.0.0.1", started=started,
                       memory_cgroup=cgroup.path if cgroup else None, oom_kills=cgroup.oom_kills if cgroup else None)


@needs_kmsg
def test_a_real_segfault_of_a_known_pid():
    started = deaths.boot_clock()
    proc = subprocess.Popen([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], stderr=subprocess.DEVNULL)
    assert proc.wait(30) == -11
    w = _wait_for(lambda: deaths.witness(_process(proc.pid, started)), until=lambda w: w.crash)
    assert w.crash == "segfault" and not w.oom_killed
    assert deaths.explain(w, proc.pid).startswith(f"worker process crashed: segfault (SIGSEGV, pid {proc.pid}")


@needs_kmsg
def test_a_sigkill_is_neither_oom_nor_crash():
    started = deaths.boot_clock()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.kill()
    assert proc.wait(30) == -9
    w = deaths.witness(_process(proc.pid, started))
    assert w.log_readable and not w.oom_killed and w.crash is None
    assert deaths.explain(w, proc.pid).startswith(f"worker process killed by SIGKILL (or another signal it does not handle; pid {proc.pid},")


def _own_memory_cgroup(tmp_name: str) -> Path | None:
    """A child of this process's v1 memory cgroup, when this machine lets a test make one."""
    mine = deaths.memory_cgroup()
    if mine is None or "/memory/" not in mine.path and not mine.path.endswith("/memory"):
        return None
    child = Path(mine.path) / tmp_name
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(64 << 20))
    except OSError:
        if child.exists():
            child.rmdir()
        return None
    return child


@needs_kmsg
def test_a_real_oom_kill_is_named_by_the_kernel_log_and_the_cgroup():
    child = _own_memory_cgroup(f"shipyard-test-{os.getpid()}")
    if child is None:
        pytest.skip("this machine does not let a test make a memory cgroup (v1) with a limit")
    try:
        started = deaths.boot_clock()
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(1); b = bytearray(512 << 20)"],
                                stdin=subprocess.PIPE)
        (child / "cgroup.procs").write_text(str(proc.pid))
        before = deaths.MemoryCgroup(str(child), deaths.oom_kill_count(child))
        proc.stdin.write(b"x")
        proc.stdin.close()
        assert proc.wait(60) == -9  # the kernel's OOM killer: SIGKILL
        w = _wait_for(lambda: deaths.witness(_process(proc.pid, started, before)), until=lambda w: w.oom_killed)
        assert w.oom_killed and w.cgroup_oom_kills == 1
        assert deaths.explain(w, proc.pid).startswith(
            f"worker process killed by the kernel's OOM killer (pid {proc.pid}, from its node's kernel log)")
    finally:
        for _ in range(50):
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _wait_for(read, until=lambda w: True, timeout_s: float = 5.0):
    """The kernel writes its line as the process dies; allow it a moment to be readable."""
    deadline = time.monotonic() + timeout_s
    while True:
        w = read()
        if until(w) or time.monotonic() > deadline:
            return w
        time.sleep(0.1)
