"""The server's copy of every run's log: bounded, resumable after a server restart, per run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shipyard.api.log_archive import LogArchive, LogArchiver


def test_runs_are_read_in_order_with_a_header_between_them_and_tail_applies(tmp_path):
    a = LogArchive(tmp_path)
    assert a.read("job-1") is None
    a.append("job-1", "shipyard-job-1-10", "third\n")
    a.append("job-1", "shipyard-job-1-2", "second\n")
    a.append("job-1", "shipyard-job-1-1", "first\nline two\n")
    text = a.read("job-1")
    assert text.index("first") < text.index("second") < text.index("third")
    assert "==> run shipyard-job-1-1 <==" in text
    assert a.read("job-1", tail=1) == "third\n"


def test_a_run_is_kept_under_its_cap_and_its_offset_counts_everything_ever_archived(tmp_path):
    a = LogArchive(tmp_path, max_bytes=10_000)
    line = "x" * 99 + "\n"
    for _ in range(300):
        a.append("job-1", "r1", line)
    path = tmp_path / "job-1" / "r1.log"
    assert path.stat().st_size <= 10_000
    assert a.offset("job-1", "r1") == 300 * len(line)
    text = a.read("job-1")
    assert text.startswith("[shipyard: older output was dropped") and text.endswith(line)


@dataclass
class Job:
    id: str
    backend_handle: str | None


class Backend:
    def __init__(self, chunks):
        self.chunks = chunks

    async def tail_logs(self, handle):
        for c in self.chunks:
            yield c


class Store:
    def __init__(self, jobs):
        self.jobs = jobs

    def active_jobs(self):
        return self.jobs

    def recently_ended_jobs(self, within_s):
        return []


async def _archive_once(store, backend, archive):
    archiver = LogArchiver(store, backend, archive, interval_s=0.01)
    task = asyncio.create_task(archiver.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if all(archive.done(j.id, j.backend_handle) for j in store.jobs if j.backend_handle):
            break
    task.cancel()
    await archiver.stop()


def test_a_restarted_server_replays_the_stream_but_archives_each_line_once(tmp_path):
    archive = LogArchive(tmp_path)
    store = Store([Job("job-1", "r1"), Job("job-2", None)])
    asyncio.run(_archive_once(store, Backend(["a\n", "b\n"]), archive))
    assert archive.read("job-1") == "a\nb\n" and archive.done("job-1", "r1")
    # The server died before the run ended: its next incarnation tails the run from the start.
    (tmp_path / "job-1" / "r1.done").unlink()
    asyncio.run(_archive_once(store, Backend(["a\n", "b\n", "c\n"]), archive))
    assert archive.read("job-1") == "a\nb\nc\n"
    assert archive.read("job-2") is None
