"""Job logs that outlive the Ray head: the server keeps a copy of every run's driver output.

A Ray head keeps a job's log only as long as it keeps the job: a head that restarts (or an
operator's ``ray job delete``) takes every log with it, and ``shipyard logs`` would print
nothing. So the server tails each active run's log as it is written (:class:`LogArchiver`, one
asyncio task per run on the server's event loop) and appends it to
``<data dir>/logs/<job id>/<run>.log``.

Bounded: a run's file is cut to its newest half once it passes ``max_bytes`` (default 50 MiB),
so a chatty job costs at most that much disk per run. A server restarted while a run goes on
tails it again from the start and skips what it already has (``<run>.offset`` counts every
character ever archived, cut ones included). A run whose stream ended is marked ``.done``.

Plain text: what is stored is cleaned line by line (:func:`shipyard.loglines.clean`): no
terminal escape codes (a driver on a terminal, or a user's coloured output, would otherwise put
them in every reader's page) and not Ray's "Running entrypoint for job ..." line (the backend's
shell command). The archiver hands over whole lines only (a chunk may end inside an escape
sequence); the offset counts the characters received, cleaned away or not.

The archive is what ``GET /v1/jobs/{id}/logs`` answers from once it holds anything for the job
(every run in order, a header line between runs); before that, the backend's live log. With
several server replicas each archives on its own (the files are per data dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from pathlib import Path

from shipyard.loglines import LineBuffer, clean, last_lines, only_rank

log = logging.getLogger(__name__)
MAX_BYTES = 50 << 20
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class LogArchive:
    def __init__(self, root: Path, max_bytes: int = MAX_BYTES):
        self.root, self.max_bytes = Path(root), max_bytes

    def _dir(self, job_id: str) -> Path:
        if not _SAFE.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def _file(self, job_id: str, run: str, suffix: str) -> Path:
        if not _SAFE.match(run):
            raise ValueError(f"not a run id: {run!r}")
        return self._dir(job_id) / f"{run}{suffix}"

    def offset(self, job_id: str, run: str) -> int:
        try:
            return int(self._file(job_id, run, ".offset").read_text())
        except (OSError, ValueError):
            return 0

    def append(self, job_id: str, run: str, received: str) -> None:
        """Store ``received`` (whole lines of the run's output), cleaned; count all of it."""
        if not received:
            return
        path = self._file(job_id, run, ".log")
        path.parent.mkdir(parents=True, exist_ok=True)
        if text := clean(received):
            with open(path, "a", encoding="utf-8", errors="replace") as f:
                f.write(text)
                size = f.tell()
            if size > self.max_bytes:
                self._cut(path)
        self._file(job_id, run, ".offset").write_text(str(self.offset(job_id, run) + len(received)))

    def _cut(self, path: Path) -> None:
        """Keep the newest half (from a line start), so the file stays under ``max_bytes``."""
        data = path.read_bytes()[-self.max_bytes // 2:]
        nl = data.find(b"\n")
        tmp = path.with_suffix(".cut")
        tmp.write_bytes(b"[shipyard: older output was dropped to keep this log under "
                        + str(self.max_bytes >> 20).encode() + b" MiB]\n" + data[nl + 1:])
        os.replace(tmp, path)

    def mark_done(self, job_id: str, run: str) -> None:
        self._file(job_id, run, ".done").parent.mkdir(parents=True, exist_ok=True)
        self._file(job_id, run, ".done").touch()

    def done(self, job_id: str, run: str) -> bool:
        return self._file(job_id, run, ".done").exists()

    def runs(self, job_id: str) -> list[str]:
        """The job's archived runs, oldest first (``shipyard-<job>-<n>``: by n)."""
        d = self._dir(job_id)
        if not d.is_dir():
            return []
        names = [p.stem for p in d.glob("*.log")]
        return sorted(names, key=lambda r: (len(r), r))

    def read(self, job_id: str, tail: int | None = None, rank: int | None = None) -> str | None:
        """Every archived run's output, oldest first (only rank ``rank``'s lines, when given:
        no run headers then); None when nothing was archived."""
        runs = self.runs(job_id)
        if not runs:
            return None
        parts = []
        for run in runs:
            text = self._file(job_id, run, ".log").read_text(encoding="utf-8", errors="replace")
            if rank is not None:
                parts.append(only_rank(text, rank))
            else:
                parts.append(f"==> run {run} <==\n{text}" if len(runs) > 1 else text)
        return last_lines("".join(parts), tail)


class LogArchiver:
    """Tails every active run's log into a :class:`LogArchive` (an asyncio task per run)."""

    def __init__(self, store, backend, archive: LogArchive, interval_s: float = 2.0):
        self.store, self.backend, self.archive, self.interval_s = store, backend, archive, interval_s
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}

    async def run(self) -> None:
        try:  # runs that ended while no server was archiving: their logs may still be on the head
            for job in await asyncio.to_thread(self.store.recently_ended_jobs, 86_400.0):
                self._start(job)
        except Exception:  # noqa: BLE001
            log.exception("log archiver: listing recently ended jobs failed")
        while True:
            try:
                jobs = await asyncio.to_thread(self.store.active_jobs)
                for job in jobs:
                    self._start(job)
            except Exception:  # noqa: BLE001 - a store hiccup must not end archiving
                log.exception("log archiver: listing active jobs failed")
            self._tasks = {k: t for k, t in self._tasks.items() if not t.done()}
            await asyncio.sleep(self.interval_s)

    def _start(self, job) -> None:
        key = (job.id, job.backend_handle)
        if job.backend_handle and key not in self._tasks and not self.archive.done(*key):
            self._tasks[key] = asyncio.create_task(self._tail(*key), name=f"logs-{key[1]}")

    async def _tail(self, job_id: str, run: str) -> None:
        skip = self.archive.offset(job_id, run)  # a restarted server replays the stream from its start
        seen = 0
        lines = LineBuffer()  # whole lines only: a chunk may end inside an escape sequence
        try:
            async for chunk in self.backend.tail_logs(run):
                new = lines.feed(chunk[max(0, skip - seen):])
                seen += len(chunk)
                if new:
                    await asyncio.to_thread(self.archive.append, job_id, run, new)
            await asyncio.to_thread(self.archive.append, job_id, run, lines.rest())
            self.archive.mark_done(job_id, run)  # the stream ends when the run does
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the run may be gone; the next pass tries again
            log.info("log archiver: tailing %s stopped: %s", run, e)

    async def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(BaseException):
                await t
