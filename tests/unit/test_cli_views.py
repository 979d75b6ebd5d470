"""`shipyard list`, `status` and `top` as a user sees them: ``-o json|yaml|wide``, ``list -q``, job
ids whole at any width, the latest events, "preempted by", no doubled "waiting:", no stale
"running as", the step a requeued job had reached.

Over the real API (FastAPI's TestClient on a SQLite store) and the real scheduler loop's
decisions (a fake backend of 2 CPUs); the CLI runs in this process (:func:`shipyard`)."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from rich.console import Console

from shipyard import cli
from shipyard.api import ApiConfig, create_app
from shipyard.backends.base import BackendStatus, Capacity, State
from shipyard.cli_output import Output, dump, job_table, parse_output, print_table
from shipyard.client import Client, config_file
from shipyard.errors import UserError
from shipyard.run.records import AttemptRecord, DriverReport, RunSnapshot
from shipyard.runtime.report import known_step
from shipyard.scheduler.decide import decide
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.store import JobState, Store

from inprocess_cli import shipyard

S = JobState
TENANT = "a-team-with-a-long-name"
SPEC = {"name": "a-job-with-a-rather-long-name", "entrypoint": "train.py:train", "dataset": {"uri": "/d"},
        "workers": {"count": 2, "cpus": 1}}
GIB = 1 << 30


class Backend:
    """A cluster of 2 CPUs, all taken: what the loop asks of a backend to decide and preempt."""

    name = "fake"

    def __init__(self):
        self.cancelled: list[str] = []

    def capacity(self) -> Capacity:
        return Capacity(cpus=2, gpus=0, memory=64 * GIB, free_cpus=0, free_gpus=0, free_memory=64 * GIB)

    def cancel(self, handle: str) -> None:
        self.cancelled.append(handle)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A store, the scheduler loop over it, and the CLI's client pointed at the API over both."""
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    store.create_tenant(TENANT)
    secret, _ = store.create_token(TENANT)
    loop = SchedulerLoop(store, Backend())
    app = create_app(store, loop=loop, config=ApiConfig(report_key=b"k"))

    def client(url, token) -> Client:
        c = Client("http://testserver", secret)
        c._http.close()
        c._http = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
        return c

    monkeypatch.setattr(cli, "_client", client)
    yield store, loop
    store.close()


def running(store: Store, priority: int = 0, step: int = 120) -> str:
    """A RUNNING job whose driver has reported an attempt at ``step`` (of 460)."""
    job = store.add_job(TENANT, SPEC, priority=priority)
    store.transition(job.id, S.QUEUED, S.ADMITTED, message="placed on 2xnode")
    handle = f"shipyard-{job.id}-1"
    store.transition(job.id, S.ADMITTED, S.RUNNING, message=f"running as {handle}", backend_handle=handle)
    store.update_job(job.id, runs=1)
    store.record_report(job.id, handle, DriverReport(schema=2, step=step, total=460, attempts=[
        AttemptRecord(number=1, start=time.time() - 30, start_step=0, last_step=step)]))
    return job.id


@pytest.fixture
def preempted(world):
    """A low-priority job preempted by a high one (the real decide() and loop), then requeued
    once its run stopped: (low, high)."""
    store, loop = world
    low = running(store)
    high = store.add_job(TENANT, SPEC, priority=10).id
    loop.apply(decide(loop.snapshot(), loop.policy))
    assert store.get_job(low).state is S.PREEMPTED
    return low, high


def test_list_prints_json_yaml_ids_only_and_whole_ids_at_40_columns(world, capsys, monkeypatch):
    store, _ = world
    ids = [store.add_job(TENANT, SPEC).id for _ in range(3)][::-1]  # newest first
    code, out, _ = shipyard(capsys, monkeypatch, "list", "-o", "json")
    doc = json.loads(out)
    assert code == 0 and [j["id"] for j in doc["items"]] == ids and doc["next_cursor"] is None
    assert doc["items"][0]["tenant"] == TENANT and doc["items"][0]["state"] == "QUEUED"
    code, out, _ = shipyard(capsys, monkeypatch, "list", "-o", "yaml")
    assert code == 0 and [j["id"] for j in yaml.safe_load(out)["items"]] == ids
    code, out, err = shipyard(capsys, monkeypatch, "list", "-q")
    assert (code, out, err) == (0, "".join(f"{i}\n" for i in ids), "")
    code, out, err = shipyard(capsys, monkeypatch, "list", "-q", "--limit", "2")
    assert out.splitlines() == ids[:2] and err.strip() == "(more: --limit 4)"
    # Piped (capsys is no terminal): full width, whatever COLUMNS said.
    for args in ((), ("-o", "wide")):
        code, out, _ = shipyard(capsys, monkeypatch, "list", *args)
        assert code == 0 and all(i in out for i in ids) and SPEC["name"] in out and TENANT in out
        assert len(out.splitlines()) == 4 + len(ids)  # 3 border/header lines, a row each, the bottom border
    # A terminal of 40 columns: the table is as wide as the ids need, the other columns shrink.
    term = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=term, force_terminal=True, width=40, no_color=True))
    assert shipyard(capsys, monkeypatch, "list")[0] == 0
    plain = re.sub(r"\x1b\[[0-9;]*m", "", term.getvalue())
    assert all(i in plain for i in ids), plain


def test_status_shows_the_latest_events_and_who_preempted_the_job(preempted, world, capsys, monkeypatch):
    store, loop = world
    low, high = preempted
    code, out, _ = shipyard(capsys, monkeypatch, "status", low)
    assert code == 0 and out.splitlines()[0] == (f"{low} {SPEC['name']} ({TENANT}, priority 0): PREEMPTED "
                                                 f"(preempted by {high}) step 120/460")
    code, out, _ = shipyard(capsys, monkeypatch, "status", high)
    assert f"  waiting: needs 2 CPUs, 0 free; preempting {low}" in out.splitlines() and "waiting: waiting" not in out
    # The stopped run is requeued: still "preempted by", and the step it reached, not 0, until
    # the next run's workers report (a new run's first report has no step).
    loop._follow(store.get_job(low), BackendStatus(State.STOPPED, "Stopped"))
    store.record_report(low, f"shipyard-{low}-2", DriverReport(schema=2, step=known_step(RunSnapshot())))
    code, out, _ = shipyard(capsys, monkeypatch, "status", low)
    lines = out.splitlines()
    assert lines[0].endswith(f": QUEUED (preempted by {high}) step 120/460"), lines
    events = [line for line in lines if line.startswith("    20")]
    assert lines[lines.index(events[0]) - 1].startswith("  events: (the latest 5; -o wide shows")
    assert len(events) == 5 and "PREEMPTED -> QUEUED (preempted)" in events[-1]
    code, out, _ = shipyard(capsys, monkeypatch, "status", low, "-o", "wide")
    wide = [line for line in out.splitlines() if line.startswith("    20")]
    assert len(wide) > 5 and wide[-5:] == events and "preempted_by" not in out
    code, out, _ = shipyard(capsys, monkeypatch, "status", low, "-o", "json")
    doc = json.loads(out)
    assert (doc["id"], doc["state"], doc["preempted_by"], doc["step"]) == (low, "QUEUED", high, 120)
    assert [a["kind"] for a in doc["attempts"]] == ["preempted"]
    code, out, _ = shipyard(capsys, monkeypatch, "status", low, "-o", "yaml")
    assert yaml.safe_load(out)["preempted_by"] == high
    assert json.loads(shipyard(capsys, monkeypatch, "status", low, "--json")[1]) == doc


def test_a_finished_job_no_longer_says_it_is_running(world, capsys, monkeypatch):
    store, loop = world
    job = running(store, step=460)
    loop._finish(store.get_job(job), S.SUCCEEDED, None, None)
    code, out, _ = shipyard(capsys, monkeypatch, "status", job)
    assert code == 0 and ": SUCCEEDED step 460/460" in out.splitlines()[0]
    assert not [line for line in out.splitlines() if line.startswith("  message:")], out
    assert json.loads(shipyard(capsys, monkeypatch, "status", job, "-o", "json")[1])["message"] is None


def test_top_prints_one_snapshot_as_json_or_yaml_and_a_frame_when_piped(world, capsys, monkeypatch):
    store, _ = world
    a, b = running(store), running(store)
    code, out, _ = shipyard(capsys, monkeypatch, "top", "-o", "json")
    doc = json.loads(out)
    assert code == 0 and {j["id"] for j in doc["items"]} == {a, b}
    assert {j["step"] for j in doc["items"]} == {120} and all(j["attempts"] for j in doc["items"])
    code, out, _ = shipyard(capsys, monkeypatch, "top", "-o", "yaml", "--all")
    assert {j["id"] for j in yaml.safe_load(out)["items"]} == {a, b}
    code, out, _ = shipyard(capsys, monkeypatch, "top", "-o", "wide")  # piped: one frame, then exit
    assert code == 0 and a in out and b in out and "120/460" in out and "shipyard top (http://testserver)" in out


@pytest.mark.parametrize("command", [["list"], ["status", "job-000000000000"], ["top"]])
def test_a_bad_output_format_is_one_line_and_exit_2(world, capsys, monkeypatch, command):
    code, out, err = shipyard(capsys, monkeypatch, *command, "-o", "xml")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error: -o/--output: got 'xml'; expected one of table, wide, json, yaml"]


def test_output_helpers():
    assert parse_output("JSON") is Output.JSON and Output.YAML.document and not Output.WIDE.document
    with pytest.raises(UserError, match="^-o/--output: got 'x'; expected one of table, wide, json, yaml$"):
        parse_output("x")
    assert json.loads(dump({"a": [1]}, Output.JSON)) == {"a": [1]}
    assert yaml.safe_load(dump({"at": "2026-12-02T03:00:00Z", "m": "x: y"}, Output.YAML)) == {
        "at": "2026-12-02T03:00:00Z", "m": "x: y"}  # strings stay strings
    long = "job-" + "f" * 12
    for width in (10, 40, 200):
        for terminal in (True, False):
            out = io.StringIO()
            t = job_table("id", "name", "note")
            t.add_row(long, "n" * 50, "a rather long note " * 5)
            print_table(Console(file=out, width=width, force_terminal=terminal, no_color=True), t)
            assert long in re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()), (width, terminal)


def test_the_help_names_the_config_file_the_client_reads(capsys, monkeypatch):
    assert config_file({}) == Path(cli.CONFIG_FILE).expanduser()
    assert config_file({"SHIPYARD_HOME": "/srv/sy"}) == Path("/srv/sy/config.yaml")
    for command in ([], ["submit"], ["status"], ["list"], ["top"], ["logs"], ["cancel"]):
        _, out, _ = shipyard(capsys, monkeypatch, *command, "--help")
        assert cli.CONFIG_FILE in out, command
