"""The run's outcome end to end without Ray: the driver's Session decides it from what it saw
and posts it typed; the report route stores it with its run; a cancel that arrives after the run
finished leaves the job SUCCEEDED and is refused (FastAPI's TestClient over a SQLite store)."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.api.auth import report_token
from shipyard.run.records import RunOutcome, RunSnapshot
from shipyard.runtime.report import Session
from shipyard.spec import JobSpec
from shipyard.store import JobState as S
from shipyard.store import Store

KEY = b"test-report-key"
TOTAL = 460
SPEC = {"name": "p", "entrypoint": "train.py:train", "dataset": {"uri": "/d"}, "workers": {"count": 2, "cpus": 1},
        "checkpoint": {"uri": "/ck", "every_steps": 10}}


def attempt(n, kind, last, start_step=0):
    return {"number": n, "start": 100.0 + n, "end": 101.0 + n if kind else None, "kind": kind,
            "start_step": start_step, "last_step": last}


@pytest.fixture
def posted(monkeypatch):
    bodies: list[dict] = []

    def post(url, json, headers, timeout):
        bodies.append(json)
        return httpx.Response(200, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    return bodies


def session(snapshot: dict, notice_at: float | None) -> Session:
    s = Session(JobSpec.model_validate(SPEC), "http://server/v1/jobs/j/report", "t", "run-1")
    s._latest, s.notice_at = RunSnapshot.model_validate(snapshot), notice_at
    return s


def test_a_run_that_returned_after_a_stop_request_without_reaching_the_end_is_stopped_not_finished(posted):
    # Attempt 1 was preempted at step 81; the attempt Ray Train opened after it ended "finished"
    # at step 95 of 460 (the loop returned on the stop): the CLI sees launch() return ok.
    s = session({"step": 95, "total": TOTAL, "attempts": [attempt(1, "preempted", 81), attempt(2, "finished", 95, 81)]},
                notice_at=102.5)
    s.finish(True)
    assert posted[-1]["outcome"]["kind"] == "stopped"


@pytest.mark.parametrize("notice_at", [None, 150.0])
def test_a_run_that_trained_to_the_end_is_finished_even_when_a_stop_reached_it_late(posted, notice_at):
    s = session({"step": TOTAL, "total": TOTAL, "attempts": [attempt(1, "finished", TOTAL)]}, notice_at)
    s.finish(True)
    assert posted[-1]["outcome"] == {"kind": "finished", "ok": True, "error": None, "step": TOTAL, "total": TOTAL}
    assert posted[-1]["schema"] == 2


def test_the_first_outcome_is_the_one_reported(posted):
    s = session({"step": 81, "total": TOTAL, "attempts": [attempt(1, "preempted", 81)]}, notice_at=100.5)
    s.finish(False, "preempted: checkpoint committed", kind=RunOutcome.PREEMPTED)
    s.finish(True)  # the CLI, as launch() returns while the stop handler is exiting
    assert [b["outcome"]["kind"] for b in posted] == ["preempted"]


def test_the_stop_handler_does_not_report_a_run_whose_training_already_ended_as_stopped(posted, monkeypatch):
    s = session({"step": TOTAL, "total": TOTAL, "attempts": [attempt(1, "finished", TOTAL)]}, notice_at=None)
    monkeypatch.setattr("os._exit", lambda code: pytest.fail(f"the driver exited {code} on a finished run"))
    s._on_sigterm().join(5)  # SIGINT from a cancel that arrived as the driver was saying goodbye
    s.finish(True)
    assert [b["outcome"]["kind"] for b in posted] == ["finished"]


@pytest.fixture
def api(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'shipyard.db'}")
    store.create_tenant("a")
    client = TestClient(create_app(store, config=ApiConfig(report_key=KEY)))
    client.token = store.create_token("a")[0]
    client.store = store
    yield client
    store.close()


def running(api) -> str:
    job = api.store.add_job("a", SPEC)
    api.store.transition(job.id, S.QUEUED, S.ADMITTED)
    api.store.transition(job.id, S.ADMITTED, S.RUNNING, backend_handle="run-1")
    return job.id


def report(api, job_id, outcome: dict | None, attempts, step):
    r = api.post(f"/v1/jobs/{job_id}/report", headers={"Authorization": f"Bearer {report_token(KEY, job_id, 'run-1')}"},
                 json={"schema": 2, "submission": "run-1", "step": step, "total": TOTAL, "attempts": attempts,
                       "outcome": outcome})
    assert r.status_code == 200 and r.json()["ok"], r.text


def cancel(api, job_id):
    return api.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {api.token}"})


def test_a_cancel_after_the_run_finished_is_refused_and_the_job_stays_succeeded(api):
    job_id = running(api)
    # The driver's last report has arrived; the loop has not yet seen Ray say SUCCEEDED.
    report(api, job_id, {"kind": "finished", "ok": True, "step": TOTAL, "total": TOTAL},
           [attempt(1, "finished", TOTAL) | {"start": time.time() - 5, "end": time.time()}], TOTAL)
    r = cancel(api, job_id)
    assert r.status_code == 409 and "is SUCCEEDED and cannot become CANCELLED" in r.text, r.text
    job = api.store.get_job(job_id)
    assert (job.state, job.progress) == (S.SUCCEEDED, 1.0)


def test_a_cancel_of_a_run_that_was_only_preempted_still_cancels(api):
    job_id = running(api)
    report(api, job_id, {"kind": "preempted", "ok": False},
           [attempt(1, "preempted", 81) | {"start": time.time() - 5, "end": time.time()}], 81)
    assert cancel(api, job_id).status_code == 200
    assert api.store.get_job(job_id).state is S.CANCELLED


def test_a_report_of_an_older_schema_is_refused_naming_the_schema_and_nothing_is_stored(api):
    job_id = running(api)
    r = api.post(f"/v1/jobs/{job_id}/report", headers={"Authorization": f"Bearer {report_token(KEY, job_id, 'run-1')}"},
                 json={"submission": "run-1", "step": 95, "total": TOTAL, "outcome": {"ok": True},
                       "attempts": [attempt(1, "finished", 95)]})  # a driver from before the typed records
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("body.schema: report schema 1 is not supported; this server reads schema 2")
    assert api.store.run_outcome(job_id, "run-1") is None and api.store.attempts(job_id) == []
    assert cancel(api, job_id).status_code == 200  # nothing taken as finished
