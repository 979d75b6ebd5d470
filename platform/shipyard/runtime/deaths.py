"""Why a worker process died without a Python error, from what its node's kernel recorded.

Ray sees only the dropped connection of a process that was SIGKILLed or crashed ("Worker
unexpectedly exits with a connection error code 2"), and cannot tell which. The kernel can:

- its log (``/dev/kmsg``) has the OOM killer's ``Killed process PID (name)`` line, or a crash's
  ``name[PID]: segfault at ...`` / ``traps: name[PID] ...`` line, for the pid;
- the memory cgroup the rank ran in (a container's; recorded when the rank started) counts the
  OOM killer's kills (``oom_kill`` in cgroup v2 ``memory.events``, v1 ``memory.oom_control``),
  which is what a container that may not read the kernel log still has.

When the log is readable and names neither for the pid, the process got a signal the kernel
does not log: SIGKILL from a person or a program (``kill -9``, ``ray stop --force``, a supervisor),
or another signal it does not handle (an ``abort()`` in native code also prints "Fatal Python
error: Aborted" among the rank's own lines).
Each rank registers its pid and cgroup reading on the Board as it starts (``worker.py``); after a
death, :func:`witness` runs on the dead rank's node (a zero-CPU Ray task pinned there, bounded
in time) and :func:`explain` words what it found.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

MAX_RECORDS = 50_000  # kernel log records read at most (the ring buffer holds a few thousand)
MAX_RECORD_BYTES = 8192  # one /dev/kmsg record (the kernel's own limit is ~1 KiB of text)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryCgroup:
    """A process's memory cgroup (a path under ``/sys/fs/cgroup``) and its OOM-kill count then."""

    path: str
    oom_kills: int


@dataclass(frozen=True)
class Witness:
    """What a node's kernel recorded of one pid since the process started."""

    log_readable: bool
    oom_killed: bool = False  # the OOM killer's line names the pid
    crash: str | None = None  # the crash line's kind: "segfault", "general protection fault", ...
    cgroup_oom_kills: int = 0  # OOM kills in the rank's memory cgroup since it started (-1: unknown)


def memory_cgroup(proc: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> MemoryCgroup | None:
    """This process's memory cgroup and its OOM-kill count; None where there is none to read."""
    try:
        lines = proc.read_text().splitlines()[:64]
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for candidate in ((root / "memory" / path.lstrip("/")) if "memory" in controllers.split(",") else None,
                          (root / path.lstrip("/")) if controllers == "" else None):
            if candidate is not None and (count := oom_kill_count(candidate)) is not None:
                return MemoryCgroup(str(candidate), count)
    return None


def oom_kill_count(cgroup: Path) -> int | None:
    """The ``oom_kill`` counter of a cgroup directory (v2 ``memory.events``, v1 ``memory.oom_control``)."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            text = (cgroup / name).read_text()[:4096]
        except OSError:
            continue
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        if m:
            return int(m.group(1))
    return None


def kernel_records(path: str = "/dev/kmsg", limit: int = MAX_RECORDS) -> list[tuple[float, str]] | None:
    """The kernel log as (seconds since boot, message) records, oldest first; None when unreadable.
    ``/dev/kmsg`` gives one record per read and EAGAIN at the end (opened non-blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records = []
    try:
        while len(records) < limit:
            try:
                raw = os.read(fd, MAX_RECORD_BYTES)
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten while reading: go on with the next
                    continue
                if e.errno == errno.EAGAIN:
                    break
                return None if not records else records
            if not raw:
                break
            head, _, message = raw.decode("utf-8", "replace").partition(";")
            fields = head.split(",")
            try:
                at = int(fields[2]) / 1e6
            except (IndexError, ValueError):
                continue
            records.append((at, message.splitlines()[0] if message else ""))
    finally:
        os.close(fd)
    return records


def find(records: list[tuple[float, str]], pid: int, since: float = 0.0) -> tuple[bool, str | None]:
    """(whether the OOM killer killed ``pid``, the kind of crash the kernel logged for it) in the
    records from ``since`` (seconds since boot) on."""
    oom, crash = False, None
    killed = re.compile(rf"\bKilled process {pid} \(")
    crashed = re.compile(rf"\[{pid}\]:? (?:(segfault) at|(general protection fault)|(trap [a-z]+(?: [a-z]+)*?)(?= ip|$| \S*:))")
    for at, message in records:
        if at < since:
            continue
        if killed.search(message):
            oom = True
        elif m := crashed.search(message):
            crash = next(g for g in m.groups() if g)
    return oom, crash


def boot_clock() -> float:
    """Seconds since boot on the kernel log's clock (CLOCK_MONOTONIC: no time while suspended)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def witness(p) -> Witness:
    """On the dead process's node: what the kernel recorded of the process ``p`` (a
    :class:`~shipyard.run.records.RankProcess`) since it started, and of its memory cgroup."""
    kills = -1
    if p.memory_cgroup is not None and p.oom_kills is not None:
        now = oom_kill_count(Path(p.memory_cgroup))
        kills = now - p.oom_kills if now is not None else -1
    records = kernel_records()
    if records is None:
        return Witness(log_readable=False, cgroup_oom_kills=kills)
    oom, crash = find(records, p.pid, since=p.started - 1.0)
    return Witness(log_readable=True, oom_killed=oom, crash=crash, cgroup_oom_kills=kills)


def explain(w: Witness | None, pid: int) -> str:
    """The cause's words for a process that died without a Python error."""
    # The log names the pid; the cgroup's count (which any process of the cgroup raises) only
    # stands in for it where the log cannot be read.
    if w is not None and (w.oom_killed or (not w.log_readable and w.cgroup_oom_kills > 0)):
        where = "its node's kernel log" if w.oom_killed else "its memory cgroup's OOM-kill count"
        return (f"worker process killed by the kernel's OOM killer (pid {pid}, from {where}): the node's memory "
                "or the container's limit ran out; ask for more memory per worker or use less")
    if w is not None and w.crash:
        signal = "SIGSEGV" if w.crash in ("segfault", "general protection fault") else "SIGILL/SIGFPE/SIGTRAP"
        return f"worker process crashed: {w.crash} ({signal}, pid {pid}, from its node's kernel log)"
    if w is not None and w.log_readable:
        return (f"worker process killed by SIGKILL (or another signal it does not handle; pid {pid}, no OOM kill "
                "or crash of it in its node's kernel log: kill -9, ray stop --force, a supervisor)")
    return ("worker process died (no Python error: killed by a signal (SIGKILL, the kernel's OOM killer) or "
            "crashed; its node's kernel log could not be read to tell which)")


def this_process(rank: int, node_ip: str):
    """The :class:`~shipyard.run.records.RankProcess` a rank registers as it starts."""
    from shipyard.run.records import RankProcess

    cgroup = memory_cgroup()
    return RankProcess(rank=rank, pid=os.getpid(), node_ip=node_ip, started=boot_clock(),
                       memory_cgroup=cgroup.path if cgroup else None, oom_kills=cgroup.oom_kills if cgroup else None)


def ask(processes, board, timeout_s: float = 5.0) -> dict[int, str]:
    """``{rank: cause}`` for the dead ``processes`` (RankProcess records), each from a witness on
    its node: the Board's actor when it runs there (no process to start), else a zero-CPU task
    pinned to the node. A node that is gone or does not answer within ``timeout_s`` in all gives
    the words for "unknown"."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(witness)
    nodes = None
    pending = {}
    for p in processes:
        ref = board.witness.remote(p)
        pending[p.rank] = (p, ref)
    deadline = time.monotonic() + timeout_s
    out = {}
    for rank, (p, ref) in pending.items():
        try:
            w = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            if w is None:  # another node's process
                if nodes is None:
                    nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                node = nodes.get(p.node_ip)
                w = ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(p),
                            timeout=max(0.1, deadline - time.monotonic())) if node else None
        except Exception:  # noqa: BLE001 - a witness that fails or times out knows nothing
            w = None
        out[rank] = explain(w, p.pid)
    return out
