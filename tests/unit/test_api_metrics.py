"""Dashboard routes, the metrics time series the charts read, and the per-job Prometheus series,
through FastAPI's TestClient over a SQLite store (no Ray, no backend, no browser)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.api.auth import report_token
from shipyard.api.metrics import MAX_METRICS_PER_JOB
from shipyard.store import JobState as S
from shipyard.store import Store

KEY = b"test-report-key"
SPEC = {"name": "train", "entrypoint": "train:train", "dataset": {"uri": "/data/digits"},
        "workers": {"count": 2, "cpus": 1}}


@pytest.fixture
def api(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'shipyard.db'}")
    store.create_tenant("a")
    client = TestClient(create_app(store, config=ApiConfig(report_key=KEY)))
    client.token = store.create_token("a")[0]
    client.admin = store.create_token("a", admin=True)[0]
    client.store = store
    yield client
    store.close()


def auth(api):
    return {"Authorization": f"Bearer {api.token}"}


def running_job(api, points, attempts=()):
    job_id = api.post("/v1/jobs", json=SPEC, headers=auth(api)).json()["id"]
    api.store.transition(job_id, S.QUEUED, S.ADMITTED, backend_handle="sub-1")
    r = api.post(f"/v1/jobs/{job_id}/report", headers={"Authorization": f"Bearer {report_token(KEY, job_id, 'sub-1')}"},
                 json={"schema": 2, "submission": "sub-1", "step": points[-1][0] if points else 0, "total": 100,
                       "attempts": list(attempts),
                       "metrics": [{"step": step, "at": at, "values": values} for step, at, values in points]})
    assert r.status_code == 200 and r.json()["ok"], r.text
    return job_id


def test_dashboard_pages_and_assets_are_public_but_the_data_is_not(api):
    for path in ("/ui", "/ui/jobs/job-anything"):
        r = api.get(path)
        assert r.status_code == 200 and "dashboard.js" in r.text and r.headers["cache-control"] == "no-cache"
    js = api.get("/ui/static/dashboard.js")
    assert js.status_code == 200 and "sessionStorage" in js.text and "Bearer " in js.text
    lib = api.get("/ui/static/uPlot.iife.min.js")
    assert lib.status_code == 200 and "MIT License" in lib.text[:300]  # the licence header ships with it
    assert api.get("/ui/static/uPlot.LICENSE").status_code == 200
    assert api.get("/ui/static/../app.py").status_code == 404
    assert api.get("/v1/jobs").status_code == 401
    assert api.get("/", follow_redirects=False).headers["location"] == "/ui"
    assert not [p for p in api.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


def test_metrics_series_in_step_order_filtered_and_incremental(api):
    t0 = time.time()
    points = [(s, t0 + s, {"loss": 1.0 / (s + 1), "lr": 0.1}) for s in range(10)]
    points.append((10, t0 + 10, {"loss": None}))  # a diverged loss (NaN, sent as null) stays a visible gap
    job_id = running_job(api, list(reversed(points)))
    got = api.get(f"/v1/jobs/{job_id}/metrics", headers=auth(api)).json()["points"]
    assert [p["step"] for p in got] == list(range(11))
    assert got[3]["values"] == {"loss": 0.25, "lr": 0.1} and got[10]["values"] == {"loss": None}
    loss = api.get(f"/v1/jobs/{job_id}/metrics?name=loss&since_step=8", headers=auth(api)).json()["points"]
    assert [(p["step"], list(p["values"])) for p in loss] == [(8, ["loss"]), (9, ["loss"]), (10, ["loss"])]


def test_prometheus_has_bounded_series_for_running_jobs_only(api):
    t0 = time.time()
    many = {f"m{i:02d}": float(i) for i in range(MAX_METRICS_PER_JOB + 5)}
    attempts = [{"number": 1, "start": t0 - 60, "end": t0 - 30, "kind": "failed", "cause": "oom", "steps_lost": 7},
                {"number": 2, "start": t0 - 20, "start_step": 5}]
    job_id = running_job(api, [(40, t0, {"loss": 0.5, **many})], attempts)
    # Per-job series name jobs and tenants: not for an anonymous scrape, nor for a user's token.
    assert job_id not in api.get("/metrics").text and job_id not in api.get("/metrics", headers=auth(api)).text
    assert "shipyard_jobs{" in api.get("/metrics").text
    text = api.get("/metrics", headers={"Authorization": f"Bearer {api.admin}"}).text
    labels = f'job="{job_id}",name="train",tenant="a"'
    assert f"shipyard_job_step{{{labels}}} 40.0" in text
    assert f"shipyard_job_progress{{{labels}}} 0.4" in text
    assert f"shipyard_job_attempts{{{labels}}} 2.0" in text
    assert f"shipyard_job_steps_lost{{{labels}}} 7.0" in text
    assert f'shipyard_job_metric{{job="{job_id}",metric="loss",name="train",tenant="a"}} 0.5' in text
    assert text.count("shipyard_job_metric{") == MAX_METRICS_PER_JOB
    api.store.transition(job_id, api.store.get_job(job_id).state, S.CANCELLED)
    assert job_id not in api.get("/metrics", headers={"Authorization": f"Bearer {api.admin}"}).text  # finished jobs leave none
