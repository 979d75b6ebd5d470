"""The REST API over a real store (SQLite, then PostgreSQL), through FastAPI's TestClient (no Ray, no backend):
auth, tenant isolation, spec validation naming fields, pagination, transitions, reports."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.api.auth import report_token
from shipyard.store import Store
from shipyard.store.runs import MAX_POINTS

KEY = b"test-report-key"


def spec(name="train", **extra):
    return {"name": name, "entrypoint": "train:train", "dataset": {"uri": "/data/digits"},
            "workers": {"count": 2, "cpus": 1}, **extra}


@pytest.fixture
def api(fresh_database_url):
    store = Store.open(fresh_database_url)  # a SQLite file, then a real PostgreSQL (tests/conftest.py)
    store.create_tenant("a")
    store.create_tenant("b")
    tokens = {"a": store.create_token("a")[0], "b": store.create_token("b")[0],
              "admin": store.create_token("a", admin=True)[0]}
    client = TestClient(create_app(store, config=ApiConfig(report_key=KEY, max_body_bytes=64_000)))
    client.tokens = tokens
    client.store = store
    yield client
    store.close()


def h(api, who):
    return {"Authorization": f"Bearer {api.tokens[who]}"}


def submit(api, who="a", body=None, **kw):
    r = api.post("/v1/jobs", json=body or spec(**kw), headers=h(api, who))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"status", "code", "message"} and err["status"] == status
    return err["message"]


def test_every_v1_route_needs_a_valid_token(api):
    assert "missing bearer token" in error(api.get("/v1/jobs"), 401)
    assert "invalid or revoked" in error(api.get("/v1/jobs", headers={"Authorization": "Bearer shp_nope"}), 401)
    assert error(api.post("/v1/jobs", json=spec()), 401)
    assert error(api.get("/v1/jobs/job-x"), 401)
    assert api.get("/healthz").status_code == 200  # ops routes are open
    assert "/v1/jobs" in api.get("/openapi.json").json()["paths"]


def test_submit_is_persisted_and_tenants_see_only_their_jobs(api):
    a = submit(api, "a", name="mine")
    b = submit(api, "b", name="theirs")
    assert api.store.get_job(a).state.value == "QUEUED"  # committed before the 201
    got = api.get(f"/v1/jobs/{a}", headers=h(api, "a")).json()
    assert (got["name"], got["state"], got["tenant"], got["spec"]["workers"]["count"]) == ("mine", "QUEUED", "a", 2)
    # Another tenant's job is "not found", exactly like a missing one, for every route.
    for method, path in (("GET", f"/v1/jobs/{b}"), ("POST", f"/v1/jobs/{b}/cancel"), ("GET", f"/v1/jobs/{b}/logs"),
                         ("GET", f"/v1/jobs/{b}/metrics")):
        assert error(api.request(method, path, headers=h(api, "a")), 404) == f"no job {b!r}"
    assert error(api.get("/v1/jobs/job-missing", headers=h(api, "a")), 404) == "no job 'job-missing'"
    assert [j["id"] for j in api.get("/v1/jobs", headers=h(api, "a")).json()["items"]] == [a]
    assert {j["id"] for j in api.get("/v1/jobs", headers=h(api, "admin")).json()["items"]} == {a, b}
    assert [j["id"] for j in api.get("/v1/jobs?tenant=b", headers=h(api, "admin")).json()["items"]] == [b]
    assert api.get(f"/v1/jobs/{b}", headers=h(api, "admin")).status_code == 200


def test_invalid_specs_are_422_naming_the_field_like_the_cli(api):
    bad = spec(workers={"count": 0})
    msg = error(api.post("/v1/jobs", json=bad, headers=h(api, "a")), 422)
    assert msg.startswith("spec: workers.count: got 0;"), msg
    msg = error(api.post("/v1/jobs", json=spec(wrokers=3), headers=h(api, "a")), 422)
    assert "spec: wrokers: unknown field; allowed: name, entrypoint" in msg
    msg = error(api.post("/v1/jobs", json={"name": "x"}, headers=h(api, "a")), 422)
    assert "spec: entrypoint: required field is missing" in msg and "spec: dataset: required field is missing" in msg
    assert "expected a mapping" in error(api.post("/v1/jobs", json=[1, 2], headers=h(api, "a")), 422)
    assert "not valid JSON" in error(api.post("/v1/jobs", content=b"{", headers={**h(api, "a"), "Content-Type": "application/json"}), 400)
    assert "body:2:1: not valid YAML" in error(api.post("/v1/jobs", content=b"name: [x", headers={
        **h(api, "a"), "Content-Type": "application/yaml"}), 400)
    assert "application/json or application/yaml" in error(api.post("/v1/jobs", content=b"x", headers={
        **h(api, "a"), "Content-Type": "text/csv"}), 415)
    assert error(api.post("/v1/jobs", content=b"x" * 70_000, headers={**h(api, "a"), "Content-Type": "application/json"}), 413)
    assert api.get("/v1/jobs", headers=h(api, "a")).json()["items"] == []  # nothing was stored


def test_yaml_body_is_accepted(api):
    body = b"name: from-yaml\nentrypoint: train:train\ndataset: {uri: /data/d}\nworkers: {count: 1}\n"
    r = api.post("/v1/jobs", content=body, headers={**h(api, "a"), "Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert api.get(f"/v1/jobs/{r.json()['id']}", headers=h(api, "a")).json()["spec"]["workers"]["count"] == 1


def test_priority_above_the_user_cap_needs_an_admin(api):
    msg = error(api.post("/v1/jobs", json=spec(priority=500), headers=h(api, "a")), 403)
    assert msg == "spec: priority: got 500; priorities above 100 need an admin token"
    assert submit(api, "a", priority=100)
    job = submit(api, "admin", priority=500)
    assert api.store.get_job(job).priority == 500


def test_pagination_is_stable_and_filters_apply(api):
    ids = [submit(api, "a", name=f"job-{i % 2}") for i in range(7)]
    seen, cursor = [], None
    while True:
        page = api.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}, headers=h(api, "a")).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
        submit(api, "a", name="late")  # new jobs do not shift the pages being read
    assert seen == ids[::-1]
    names = {j["name"] for j in api.get("/v1/jobs?name=job-1", headers=h(api, "a")).json()["items"]}
    assert names == {"job-1"}
    assert "limit" in error(api.get("/v1/jobs?limit=0", headers=h(api, "a")), 422)
    assert "state: unknown job state 'bogus'" in error(api.get("/v1/jobs?state=bogus", headers=h(api, "a")), 400)
    assert error(api.get("/v1/jobs?cursor=abc", headers=h(api, "a")), 400).startswith("cursor:")


def test_cancel_then_illegal_transition_is_409(api):
    job = submit(api)
    r = api.post(f"/v1/jobs/{job}/cancel", headers=h(api, "a"))
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    msg = error(api.post(f"/v1/jobs/{job}/cancel", headers=h(api, "a")), 409)
    assert "is CANCELLED and cannot become CANCELLED" in msg
    assert [j["state"] for j in api.get("/v1/jobs?state=CANCELLED", headers=h(api, "a")).json()["items"]] == ["CANCELLED"]


def test_driver_reports_store_attempts_metrics_and_move_the_state(api):
    store = api.store
    job = submit(api)
    store.transition(job, "QUEUED", "ADMITTED")
    store.update_job(job, backend_handle="run-1")
    url = f"/v1/jobs/{job}/report"
    assert error(api.post(url, json={}, headers=h(api, "a")), 403)  # a user token is not a report token
    assert error(api.post(url, json={}, headers={"Authorization": f"Bearer {report_token(KEY, 'job-other', 'run-1')}"}), 403)
    auth = {"Authorization": f"Bearer {report_token(KEY, job, 'run-1')}"}
    # The token is checked before the body is read, and it is bound to its run.
    assert error(api.post(url, content=b"{" * 5000, headers={"Content-Type": "application/json"}), 401)
    stale = {"Authorization": f"Bearer {report_token(KEY, job, 'run-0')}"}
    assert "not run-1" in error(api.post(url, json={"schema": 2, "submission": "run-1"}, headers=stale), 403)
    assert api.post(url, json={"schema": 2, "step": 3}, headers=stale).json()["ok"] is False  # a stale run's is dropped
    t0 = time.time()
    points = [{"step": i, "at": t0, "values": {"loss": 1.0 / (i + 1)}} for i in range(MAX_POINTS + 500)]
    body = {"schema": 2, "submission": "run-1", "step": 40, "total": 100, "checkpoint": "/ck/step-000000040",
            "attempts": [{"number": 1, "start": t0, "start_step": 0, "last_step": 40, "first_step_at": t0 + 1.5}],
            "events": [{"at": t0, "message": "checkpoint at step 40 committed"}], "metrics": points}
    r = api.post(url, json=body, headers=auth)
    assert r.json() == {"ok": True, "state": "RUNNING"}
    # The first attempt failed; Ray Train restarts the group: RESTARTING until the restart's first step.
    body.update(metrics=[], events=[], attempts=[
        {"number": 1, "start": t0, "end": t0 + 5, "kind": "failed", "cause": "rank 1: worker process died",
         "start_step": 0, "last_step": 43, "steps_lost": 3},
        {"number": 2, "start": t0 + 6, "start_step": 40, "last_step": 40}])
    assert api.post(url, json=body, headers=auth).json()["state"] == "RESTARTING"
    body["attempts"][1].update(last_step=60, first_step_at=t0 + 8)
    body.update(step=60)
    assert api.post(url, json=body, headers=auth).json()["state"] == "RUNNING"
    got = api.get(f"/v1/jobs/{job}", headers=h(api, "a")).json()
    assert [(a["number"], a["kind"], a["steps_lost"]) for a in got["attempts"]] == [(1, "failed", 3), (2, None, None)]
    assert (got["step"], got["total_steps"], got["progress"], got["checkpoint"]) == (60, 100, 0.6, "/ck/step-000000040")
    assert got["metrics"]["loss"] == pytest.approx(1.0 / (MAX_POINTS + 500))
    assert any("checkpoint at step 40" in e["message"] for e in got["events"])
    series = api.get(f"/v1/jobs/{job}/metrics?name=loss", headers=h(api, "a")).json()["points"]
    assert len(series) <= MAX_POINTS and series[0]["step"] == 0 and series[-1]["step"] == MAX_POINTS + 499
    # A token cannot speak for another run than its own.
    assert error(api.post(url, json={**body, "submission": "run-0"}, headers=auth), 403)


def test_prometheus_metrics_have_bounded_labels(api):
    job = submit(api)
    api.get(f"/v1/jobs/{job}", headers=h(api, "a"))
    text = api.get("/metrics").text
    assert 'shipyard_jobs{state="QUEUED"} 1.0' in text
    assert "shipyard_submissions_total 1.0" in text
    assert job not in text  # ids never become label values


SERVE = """
import sys, uvicorn
from shipyard.api import ApiConfig, create_app
from shipyard.store import Store
store = Store.open(sys.argv[1])
uvicorn.run(create_app(store, config=ApiConfig(report_key=b"k")), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


def test_every_acknowledged_submit_survives_a_kill_9_of_the_server_under_concurrent_load(fresh_database_url):
    """201 only after the commit, with concurrent submits sharing commits: SIGKILL the server
    while 20 clients submit; every id it answered 201 for is in the store afterwards."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    from conftest import free_port

    with Store.open(fresh_database_url) as store:
        store.create_tenant("a")
        token = store.create_token("a")[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, fresh_database_url, str(port)])
    base, acked, stop = f"http://127.0.0.1:{port}", [], threading.Event()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)

        def client(i: int) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/jobs", json=spec(f"k{i}"))
                    except httpx.HTTPError:
                        return  # the server died mid-request: not acknowledged
                    assert r.status_code == 201, r.text
                    acked.append(r.json()["id"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        while len(acked) < 200:
            assert proc.poll() is None and all(t.is_alive() for t in threads)
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    stored, cursor = set(), None
    with Store.open(fresh_database_url) as store:
        while True:
            page = store.list_jobs(limit=1000, cursor=cursor)
            stored |= {j.id for j in page.items}
            if (cursor := page.next_cursor) is None:
                break
    assert len(acked) >= 200 and set(acked) <= stored, (len(acked), len(set(acked) - stored))
