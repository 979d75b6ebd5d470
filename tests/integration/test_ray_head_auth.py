"""The local Ray head `shipyard server` starts on a fresh machine: token auth always on, and an
environment without the server's secrets (every job's driver inherits it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard.backends.ray_head import TOKEN_FILE, auth_env, ensure_head

pytestmark = pytest.mark.integration

PROBE = """
import sys, time
from ray.job_submission import JobSubmissionClient
try:
    print(len(JobSubmissionClient(sys.argv[1]).list_jobs()))
except Exception as e:
    print("refused:", type(e).__name__, str(e)[:200].replace(chr(10), " "))
from shipyard.runtime.ray_adapter import dashboard_address
try:
    dashboard_address(sys.argv[2], timeout_s=10)
    print("gcs answered")
except Exception as e:
    print("refused:", type(e).__name__, str(e)[:200].replace(chr(10), " "))
from ray.util.client_connect import connect
try:
    connect(sys.argv[3].removeprefix("ray://"), connection_retries=1)
    print("client joined")
except Exception as e:
    print("refused:", type(e).__name__, str(e)[:200].replace(chr(10), " "))
"""


def probe(dashboard: str, gcs: str, client: str, env: dict) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, dashboard, gcs, client], env=env, capture_output=True,
                       text=True, timeout=120)
    return [line for line in r.stdout.splitlines() if line.startswith(("refused", "gcs", "client")) or line.isdigit()]


def test_a_fresh_machines_local_head_refuses_callers_without_its_token(tmp_path, monkeypatch):
    home = tmp_path / "home"  # a fresh machine: no ~/.ray/auth_token anywhere
    home.mkdir()
    data = tmp_path / "server"
    data.mkdir()
    monkeypatch.setenv("SHIPYARD_ADMIN_TOKEN", "shp_server-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-aws-secret")
    head = ensure_head(data, num_cpus=1)
    try:
        token = data / TOKEN_FILE
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) >= 32
        environ = Path(f"/proc/{head.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if b"server-secret" in v or b"server-aws-secret" in v]
        assert b"RAY_AUTH_MODE=token" in environ


        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        base.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
        env_auth = {**base, **auth_env(data)}
        dashboard = _dashboard(head.address, env_auth)
        client = f"ray://127.0.0.1:{head.client_port}"
        anonymous = probe(dashboard, head.address, client, base)
        assert len(anonymous) == 3 and all(line.startswith("refused") for line in anonymous), anonymous
        assert "Unauthorized" in anonymous[0] or "401" in anonymous[0], anonymous
        assert probe(dashboard, head.address, client, env_auth)[:2] == ["0", "gcs answered"]
    finally:
        head.stop(timeout_s=5)


def _dashboard(gcs: str, env: dict) -> str:
    code = "import sys; from shipyard.backends.ray import wait_for_head; print(wait_for_head(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]
