"""The web dashboard in a real headless Chromium (Debian's, driven by selenium through chromedriver).

A finished job with one injected failure is seeded through the real API: submitted over HTTP, admitted
by the store (the scheduler's step), then its driver's report (metrics, two attempts, the first one
``failed``) posted to ``/v1/jobs/{id}/report`` with the job's report token, exactly as
``shipyard.runtime.report`` posts it. The server is uvicorn in a thread on a free 127.0.0.1 port
(with token auth on). The browser signs in with a token, opens the job list and the job page, and
the test checks the loss chart holds every reported point, the attempts timeline shows the failure
with its cause, and the live log is shown. A screenshot is saved under the test's tmp dir.

Missing Chromium (or selenium) skips the test, except under CI (``CI`` set), where it fails:
``deploy/chromium.sh`` installs both.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

from conftest import free_port

pytestmark = pytest.mark.integration
CAUSE = "worker died: injected fault (SIGKILL)"
STEPS = 120


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test: run deploy/chromium.sh")
    pytest.skip(f"{reason} (run deploy/chromium.sh; under CI this is a failure)")


def _chromium() -> tuple[str, str]:
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        _missing(f"no Chromium found (chromium: {browser}, chromedriver: {driver})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("the selenium package is not installed")
    return browser, driver


class FakeBackend:
    """Just enough backend for the logs route (the dashboard polls it) and /healthz."""

    def logs(self, handle: str, tail: int | None = None) -> str:
        return "".join(f"[rank 0] step {s} loss {2.0 / (1 + s / 10):.4f}\n" for s in range(0, STEPS, 10)) + \
               f"{CAUSE}\nrestored from checkpoint at step 50\ntraining finished\n"

    def capacity(self):
        return None


@pytest.fixture
def server(tmp_path):
    import uvicorn

    from shipyard.api import ApiConfig, create_app
    from shipyard.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'shipyard.db'}")
    store.create_tenant("team")
    token = store.create_token("team")[0]
    app = create_app(store, backend=FakeBackend(), config=ApiConfig(report_key=b"dashboard-test"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", token, store
    srv.should_exit = True
    thread.join(10)
    store.close()


def seed_finished_job_with_one_failure(url: str, token: str, store) -> tuple[str, int]:
    """Returns the job id and how many loss points were reported."""
    from shipyard.api.auth import report_token
    from shipyard.store import JobState as S

    spec = {"name": "digits-ft", "entrypoint": "train:train", "dataset": {"uri": "/data/digits"},
            "workers": {"count": 2, "cpus": 1}}
    r = httpx.post(f"{url}/v1/jobs", json=spec, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    store.transition(job_id, S.QUEUED, S.ADMITTED, backend_handle="raysubmit_1")
    t0 = time.time() - 600
    # Attempt 1 runs steps 0..79, checkpoints at 50, dies; attempt 2 resumes at 50 and finishes.
    points = [{"step": s, "at": t0 + s * 2.0, "values": {"loss": 2.0 / (1 + s / 10), "samples_per_s": 500.0 + s}}
              for s in range(0, 80)]
    points += [{"step": s, "at": t0 + 200 + s * 2.0, "values": {"loss": 2.0 / (1 + s / 10), "samples_per_s": 520.0}}
               for s in range(80, STEPS)]
    attempts = [
        {"number": 1, "start": t0, "end": t0 + 160, "kind": "failed", "cause": CAUSE, "start_step": 0,
         "last_step": 79, "committed_step": 50, "steps_lost": 29},
        {"number": 2, "start": t0 + 170, "end": t0 + 440, "kind": "finished", "cause": None, "start_step": 50,
         "last_step": STEPS - 1, "committed_step": STEPS - 1, "steps_lost": 0, "first_step_at": t0 + 180},
    ]
    body = {"schema": 2, "submission": "raysubmit_1", "step": STEPS, "total": STEPS,
            "checkpoint": "file:///ckpt/step-119", "attempts": attempts,
            "events": [{"at": t0 + 165, "message": "restarting from step 50"}], "metrics": points,
            "outcome": None}
    r = httpx.post(f"{url}/v1/jobs/{job_id}/report", json=body,
                   headers={"Authorization": f"Bearer {report_token(b'dashboard-test', job_id, 'raysubmit_1')}"})
    assert r.status_code == 200 and r.json()["ok"], r.text
    store.transition(job_id, S.RUNNING, S.SUCCEEDED, message="finished")
    return job_id, len(points)


def test_dashboard_shows_loss_chart_and_the_failed_attempt(server, tmp_path):
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, token, store = server
    job_id, n_points = seed_finished_job_with_one_failure(url, token, store)

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2200", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path,
                                                       log_output=str(tmp_path / "chromedriver.log")))
    wait = WebDriverWait(d, 20)
    shot = tmp_path / "dashboard.png"
    try:
        # The page is public; the data is not: it asks for the token first.
        d.get(f"{url}/ui")
        wait.until(EC.presence_of_element_located((By.ID, "token"))).send_keys(token)
        d.find_element(By.CSS_SELECTOR, "#login-form button").click()
        row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')))
        assert "SUCCEEDED" in row.text and "team" in row.text and "100%" in row.text
        assert d.execute_script("return sessionStorage.getItem('shipyard.token')") == token

        row.find_element(By.TAG_NAME, "a").click()
        loss = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '[data-metric="loss"][data-points]')))
        assert int(loss.get_attribute("data-points")) == n_points
        assert loss.find_elements(By.TAG_NAME, "canvas"), "uPlot drew no canvas"
        # The chart holds the reported values themselves, in step order, not just their count.
        assert int(loss.get_attribute("data-last-step")) == STEPS - 1
        assert float(loss.get_attribute("data-last-value")) == pytest.approx(2.0 / (1 + (STEPS - 1) / 10))
        assert d.find_elements(By.CSS_SELECTOR, '[data-metric="samples_per_s"]')
        assert d.find_elements(By.CSS_SELECTOR, '[data-metric="steps/s"]')  # throughput, derived

        attempts = d.find_element(By.ID, "attempts")
        assert (attempts.get_attribute("data-attempts"), attempts.get_attribute("data-failures")) == ("2", "1")
        failed = d.find_element(By.CSS_SELECTOR, ".timeline .attempt.kind-failed")
        assert failed.get_attribute("data-cause") == CAUSE
        assert CAUSE in attempts.text and "29 steps lost" in attempts.text
        assert d.find_element(By.CSS_SELECTOR, ".timeline .attempt.kind-finished")
        assert "file:///ckpt/step-119" in d.find_element(By.ID, "checkpoints-box").text
        wait.until(lambda _: "training finished" in d.find_element(By.ID, "logs").text)
        assert not d.find_elements(By.ID, "page-error")
        # The one expected error: the first, token-less API call answered 401 (then the sign-in form).
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and " 401 " not in e["message"]]
        assert not errors, errors
    finally:
        d.save_screenshot(str(shot))
        print(f"dashboard screenshot: {shot}")
        d.quit()


def test_shipyard_top_once_shows_the_running_job_with_its_progress_and_built_in_metrics(server, shipyard):
    """`shipyard top` is the dashboard's terminal version: the real command, one frame, against
    the same real server; only the running job is listed, with its progress and metrics."""
    from shipyard.api.auth import report_token
    from shipyard.store import JobState as S

    url, token, store = server
    finished, _ = seed_finished_job_with_one_failure(url, token, store)
    spec = {"name": "lm-top", "entrypoint": "train:train", "dataset": {"uri": "/data/lm"}}
    job_id = httpx.post(f"{url}/v1/jobs", json=spec, headers={"Authorization": f"Bearer {token}"}).json()["id"]
    store.transition(job_id, S.QUEUED, S.ADMITTED, backend_handle="raysubmit_2")
    t0 = time.time() - 60
    builtins = {"step_time_s": 0.25, "data_wait_s": 0.01, "samples_per_s": 256.0, "tokens_per_s": 65536.0}
    points = [{"step": s, "at": t0 + s, "values": {"loss": 4.0 / s, **builtins}} for s in range(1, 41)]
    body = {"schema": 2, "submission": "raysubmit_2", "step": 40, "total": 100, "metrics": points,
            "attempts": [{"number": 1, "start": t0, "start_step": 0, "last_step": 40}]}
    r = httpx.post(f"{url}/v1/jobs/{job_id}/report", json=body,
                   headers={"Authorization": f"Bearer {report_token(b'dashboard-test', job_id, 'raysubmit_2')}"})
    assert r.json() == {"ok": True, "state": "RUNNING"}, r.text

    r = shipyard("top", "--once", "--url", url, "--token", token, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(line for line in r.stdout.splitlines() if job_id in line)
    assert "lm-top" in row and "RUNNING" in row and "40/100" in row and "40%" in row, r.stdout
    assert row.index("loss=0.1") < row.index("step_time_s=0.25"), row  # the job's own metrics first
    assert finished not in r.stdout and "q quits" not in r.stdout
    # The same built-ins are per-job Prometheus gauges while the job runs.
    assert job_id not in httpx.get(f"{url}/metrics").text  # per-job series are for an admin's scrape
    admin = store.create_token("team", admin=True)[0]
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin}"}).text
    assert f'shipyard_job_metric{{job="{job_id}",metric="samples_per_s",name="lm-top",tenant="team"}} 256.0' in text
