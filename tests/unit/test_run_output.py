"""Clean run output without Ray: the line functions (shipyard.loglines), the driver's routing of
worker lines to ``[rank N] line`` (runtime/output.py), the archive's cleaning and ``--rank``
filter, the CLI's ``logs --rank``, one throughput figure, and the teardown SIGTERM."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from shipyard.errors import UserError
from shipyard.loglines import LineBuffer, clean, cleaned, only_rank, rank_of, strip_ansi, with_rank
from shipyard.run.records import RankProcess
from shipyard.runtime.output import OutputOptions, RankOutput, parse_ranks
from shipyard.runtime.ray_adapter import WorkerLines

# -- line functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, plain", [
    ("\x1b[31mred\x1b[0m text", "red text"),
    ("\x1b[1;38;5;208mbold orange\x1b[39;49m", "bold orange"),
    ("(RayTrainWorker pid=12)\x1b[0m hi", "(RayTrainWorker pid=12) hi"),
    ("progress\x1b[2K\x1b[1G100%", "progress100%"),
    ("\x1b]8;;https://x.org\x1b\\link\x1b]8;;\x1b\\", "link"),  # an OSC 8 hyperlink
    ("\x1b]0;title\x07after", "after"),
    ("\x1b(B\x1b[mreset by tput", "reset by tput"),
    ("a lone \x1b escape", "a lone  escape"),
    ("[rank 0] plain [brackets] stay", "[rank 0] plain [brackets] stay"),
])
def test_strip_ansi(raw, plain):
    assert strip_ansi(raw) == plain


def test_rank_prefix_round_trips_and_filters():
    assert with_rank(3, "hello") == "[rank 3] hello"
    assert rank_of("[rank 3] hello") == 3 and rank_of("[rank 12] x") == 12
    assert rank_of("digits: step 5/10") is None and rank_of(" [rank 1] indented") is None
    text = "[rank 0] a\n[rank 1] b\nplatform line\n[rank 1] c\n[rank 10] d\n"
    assert only_rank(text, 1) == "[rank 1] b\n[rank 1] c\n"
    assert only_rank(text, 0) == "[rank 0] a\n"


def test_clean_drops_rays_entrypoint_line_and_escapes():
    text = ("Running entrypoint for job shipyard-job-1-1: export TMPDIR=\"$PWD\"; printf '%s' ... && exec shipyard run\n"
            "\x1b[1mdigits\x1b[0m: 2 workers\n[rank 0] \x1b[32mok\x1b[0m\n")
    assert clean(text) == "digits: 2 workers\n[rank 0] ok\n"


def test_line_buffer_sees_an_escape_split_between_chunks_whole():
    chunks = ["[rank 0] \x1b[3", "1mred\x1b[0m\n[rank", " 1] b\npartial"]
    assert "".join(cleaned(chunks)) == "[rank 0] red\n[rank 1] b\npartial"
    assert "".join(cleaned(chunks, rank=1)) == "[rank 1] b\n"
    buf = LineBuffer()
    assert buf.feed("no newline") == "" and buf.pending == 10 and buf.rest() == "no newline"


def test_parse_ranks():
    assert parse_ranks("all") is None and parse_ranks("ALL") is None
    assert parse_ranks("0") == {0} and parse_ranks("0,2") == {0, 2}
    for bad in ("", "x", "-1", "1,,2"):
        with pytest.raises(UserError, match="--ranks"):
            parse_ranks(bad)


# -- the driver's routing ------------------------------------------------------------------------------


def worker(pid, *lines, ip="10.0.0.1", is_err=False, actor="RayTrainWorker"):
    return WorkerLines(pid=pid, ip=ip, is_err=is_err, lines=tuple(lines), actor=actor)


def router(**options):
    out: list[str] = []
    return RankOutput(out.append, OutputOptions(**options)), out


def test_a_registered_process_s_lines_are_prefixed_with_its_rank_stdout_and_stderr_alike():
    r, out = router()
    r.learn([RankProcess(rank=0, pid=100, node_ip="10.0.0.1"), RankProcess(rank=1, pid=101, node_ip="10.0.0.1")])
    r.on_lines(worker(101, "b1", "b2"))
    r.on_lines(worker(100, "a1", is_err=True))
    r.on_lines(worker(101, "same"))
    r.on_lines(worker(100, "same"))  # identical lines of two ranks are two lines (Ray would fold them)
    assert out == ["[rank 1] b1", "[rank 1] b2", "[rank 0] a1", "[rank 1] same", "[rank 0] same"]


def test_lines_before_the_registration_wait_for_it_in_order():
    r, out = router()
    r.on_lines(worker(100, "early 1"))
    r.on_lines(worker(100, "early 2"))
    assert out == []
    r.learn([RankProcess(rank=0, pid=100, node_ip="10.0.0.1")])
    r.on_lines(worker(100, "later"))
    assert out == ["[rank 0] early 1", "[rank 0] early 2", "[rank 0] later"]


def test_a_process_named_by_another_address_is_found_by_its_pid():
    r, out = router()
    r.learn([RankProcess(rank=1, pid=7, node_ip="10.0.0.2")])
    r.on_lines(worker(7, "x", ip="node-b.internal"))
    assert out == ["[rank 1] x"]
    r.learn([RankProcess(rank=0, pid=7, node_ip="10.0.0.3")])  # the same pid on two nodes: only exact matches
    r.on_lines(worker(7, "y", ip="10.0.0.3"))
    r.on_lines(worker(7, "z", ip="elsewhere"))
    assert out == ["[rank 1] x", "[rank 0] y"]


def test_rays_own_lines_only_when_verbose():
    batches = [worker("raylet", "A worker died or was killed while executing a task", actor=None),
               worker(55, "Started training replica group", actor="TrainController"),
               worker(56, "a task line", actor=None),
               worker(57, "never registered")]
    quiet, quiet_out = router()
    loud, loud_out = router(verbose=True)
    for b in batches:
        quiet.on_lines(b)
        loud.on_lines(b)
    quiet.close()
    loud.close()
    assert quiet_out == []
    assert loud_out == ["(raylet) A worker died or was killed while executing a task",
                        "(TrainController pid=55) Started training replica group", "(56) a task line",
                        "(RayTrainWorker pid=57) never registered"]


def test_ranks_option_and_escape_codes():
    r, out = router(ranks=frozenset({0}))
    r.learn([RankProcess(rank=0, pid=1, node_ip="h"), RankProcess(rank=1, pid=2, node_ip="h")])
    r.on_lines(worker(1, "\x1b[31mred\x1b[0m", ip="h"))
    r.on_lines(worker(2, "hidden", ip="h"))
    assert out == ["[rank 0] red"]
    tty, tty_out = router(keep_ansi=True)
    tty.learn([RankProcess(rank=0, pid=1, node_ip="h")])
    tty.on_lines(worker(1, "\x1b[31mred\x1b[0m", ip="h"))
    assert tty_out == ["[rank 0] \x1b[31mred\x1b[0m"]


def test_drain_waits_for_a_quiet_spell_and_no_longer_than_its_bound():
    now = [0.0]
    r = RankOutput(lambda line: None, clock=lambda: now[0])

    def sleep(s):
        now[0] += s
        if now[0] < 0.3:
            r.on_lines(worker(1, "still coming"))

    r.drain(quiet_s=0.5, max_s=3.0, sleep=sleep)
    assert 0.75 <= now[0] <= 0.9  # the last line at ~0.3 s, then 0.5 s of quiet
    now[0] = 10.0
    r.last_line_at = 10.0
    r.drain(quiet_s=0.5, max_s=1.0, sleep=lambda s: (now.__setitem__(0, now[0] + s), r.on_lines(worker(1, "x"))))
    assert now[0] == pytest.approx(11.0, abs=0.06)


# -- the display: no folding, one throughput ---------------------------------------------------------


def test_the_view_neither_folds_nor_colours_a_piped_line_and_prints_one_throughput():
    from shipyard.display import RunView
    from shipyard.run.records import AttemptKind, AttemptRecord, RunSnapshot
    from shipyard.runtime.launcher import RunResult
    from shipyard.spec import JobSpec

    buf = io.StringIO()
    console = Console(file=buf, width=80, soft_wrap=True)  # not a terminal, as the CLI builds it when piped
    spec = JobSpec.model_validate({"name": "digits", "entrypoint": "train.py:train", "dataset": {"uri": "/d"}})
    view = RunView(console, spec)
    line = "[rank 1] " + "y" * 150
    view.write_line(line)
    snap = RunSnapshot(step=10, total=10, samples_per_step=64, updated=20.0,
                       metrics={"loss": 0.5, "samples_per_s": 1234.0, "step_time_s": 0.05},
                       attempts=[AttemptRecord(number=1, start=0.0, kind=AttemptKind.FINISHED, end=20.0)])
    assert view.info(snap) == "loss=0.5  1,234 samples/s"
    view.summary(RunResult(True, 20.0, snap))
    printed = buf.getvalue().splitlines()
    assert printed[0] == line
    assert "\x1b" not in buf.getvalue()
    assert printed[1] == "✓ digits finished: step 10/10 in 20.0s, 2 workers, 1 attempt"
    assert sum(("samples/s" in p) + ("samples_per_s" in p) for p in printed) == 1


# -- the archive and `shipyard logs --rank` ---------------------------------------------------------------


def test_the_archive_stores_plain_text_and_counts_what_it_received(tmp_path):
    from shipyard.api.log_archive import LogArchive

    a = LogArchive(tmp_path)
    received = "Running entrypoint for job j: export X=1; exec shipyard run\n\x1b[1mj\x1b[0m\n[rank 1] \x1b[31mb\x1b[0m\n"
    a.append("job-1", "r1", received)
    assert a.read("job-1") == "j\n[rank 1] b\n"
    assert a.offset("job-1", "r1") == len(received)
    a.append("job-1", "r2", "[rank 0] a\n[rank 1] c\n")
    assert a.read("job-1", rank=1) == "[rank 1] b\n[rank 1] c\n"
    assert a.read("job-1", rank=1, tail=1) == "[rank 1] c\n"


def test_the_archiver_hands_over_whole_lines(tmp_path):
    from shipyard.api.log_archive import LogArchive, LogArchiver

    class Backend:
        async def tail_logs(self, handle):
            for c in ["[rank 0] \x1b[3", "2mgreen\x1b[0m\nhalf", " a line\nend"]:
                yield c

    class Job:
        id, backend_handle = "job-1", "r1"

    class Store:
        def active_jobs(self):
            return [Job()]

        def recently_ended_jobs(self, within_s):
            return []

    archive = LogArchive(tmp_path)

    async def main():
        archiver = LogArchiver(Store(), Backend(), archive, interval_s=0.01)
        task = asyncio.create_task(archiver.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if archive.done("job-1", "r1"):
                break
        task.cancel()
        await archiver.stop()

    asyncio.run(main())
    assert archive.read("job-1") == "[rank 0] green\nhalf a line\nend"
    assert archive.offset("job-1", "r1") == len("[rank 0] \x1b[32mgreen\x1b[0m\nhalf a line\nend")


def test_logs_rank_through_the_api_and_the_cli(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from shipyard import cli
    from shipyard.api import create_app
    from shipyard.api.log_archive import LogArchive
    from shipyard.client import Client
    from shipyard.store import Store

    store = Store.open(None, data_dir=tmp_path / "server")
    store.create_tenant("a")
    token, _ = store.create_token("a")
    archive = LogArchive(tmp_path / "logs")
    http = TestClient(create_app(store, logs=archive), headers={"Authorization": f"Bearer {token}"})
    r = http.post("/v1/jobs", json={"name": "t", "entrypoint": "train:train", "dataset": {"uri": "/data/d"}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    archive.append(job_id, "run-1", "t: 2 workers\n[rank 0] a\n[rank 1] b\n[rank 1] c\n✓ t finished\n")
    assert http.get(f"/v1/jobs/{job_id}/logs", params={"rank": 1}).text == "[rank 1] b\n[rank 1] c\n"
    assert http.get(f"/v1/jobs/{job_id}/logs", params={"rank": 1, "tail": 1}).text == "[rank 1] c\n"
    assert http.get(f"/v1/jobs/{job_id}/logs", params={"rank": -1}).status_code == 422

    def client(url, token):
        c = Client("http://testserver", "unused")
        c._http = http
        return c

    monkeypatch.setattr(cli, "_client", client)
    result = CliRunner().invoke(cli.app, ["logs", job_id, "--rank", "0"])
    assert result.exit_code == 0, result.output
    assert result.output == "[rank 0] a\n"
    store.close()


# -- the teardown SIGTERM -----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from shipyard.runtime import preemption
    signal.signal(signal.SIGTERM, lambda s, f: (print("the handler before shipyard's", flush=True), sys.exit(3)))
    assert preemption.install(grace_s=30)
    preemption.finished()  # train(ctx) returned: the SIGTERM that follows is the end of the run
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    print("still alive", flush=True)
""")


def test_a_sigterm_after_train_returned_is_not_a_preemption():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[0] == "the handler before shipyard's", r.stdout + r.stderr
    assert r.returncode == 3 and "still alive" not in r.stdout
    assert "SIGTERM" not in r.stdout + r.stderr
