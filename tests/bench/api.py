"""Submit latency with 50 concurrent clients, on SQLite and on PostgreSQL, in one run.

The API app (the same `create_app` `shipyard server` serves, under uvicorn with its defaults)
runs on 127.0.0.1 in a separate process; client threads, each with its own HTTP connection
(httpx), POST job specs to `/v1/jobs` (a 201 means the job is committed to the store). The
scheduler loop is not running, so only the API and the store are measured. PostgreSQL is a real
server started by deploy/postgres.sh (fsync off: it is a test server). Goal: p99 <= 50 ms.

Per store, three kinds of line:

- ``closed``, 1 client: one request at a time, the floor of the latency;
- ``closed``, 50 clients: each sends its next submit as soon as the previous one is answered,
  so the server is saturated and ``submits_per_s`` is its capacity. The latency here is mostly
  queueing: with every CPU busy, p50 is about ``clients / submits_per_s``;
- ``open``, 50 clients at a fixed total rate (``--rates``, submits/s): each client sends on a
  schedule, whatever the answers, and latency is counted from the *scheduled* send time (so a
  slow answer that delays the next send is charged to that send too). This is what 50 users
  get at that load, below saturation.

Every line has ``p99_ms / goal`` as ``p99_vs_goal``; ``server_cpu_ms_per_submit`` is the server
process's CPU time (user + system, from /proc) divided by the submits, ``client_cpu_ms_per_submit``
this process's (the clients share the machine's cores with the server).

    .venv/bin/python tests/bench/api.py [--clients 50] [--per-client 20] [--rates 50,200] [--open-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
GOAL_P99_MS = 50
SPEC = {"name": "bench", "entrypoint": "train.py:train", "dataset": {"uri": "/data/digits"},
        "workers": {"count": 2, "cpus": 1}}

SERVE = """
import json, sys, uvicorn
from shipyard.api import ApiConfig, create_app
from shipyard.api.serve import _server_class
from shipyard.store import Store
store = Store.open(sys.argv[1])
store.create_tenant("bench")
token = store.create_token("bench")[0]
open(sys.argv[3], "w").write(token)
# As `shipyard server` runs it; this Server returns on SIGTERM (uvicorn's own re-raises it).
_server_class()(uvicorn.Config(create_app(store, config=ApiConfig(report_key=b"k")), host="127.0.0.1",
                               port=int(sys.argv[2]), log_level="warning")).run()
commits = getattr(store, "_submits", None)
if commits is not None:
    open(sys.argv[3] + ".stats", "w").write(json.dumps({"commits": commits.batches, "jobs": commits.jobs}))
store.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Target:
    """The API server process for one store URL."""

    def __init__(self, url: str, label: str, tmp: Path):
        self.label, self.port, self.token_file = label, free_port(), tmp / f"{label}.token"
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, url, str(self.port), str(self.token_file)])
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200 and self.token_file.exists():
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the API server did not start")
            time.sleep(0.2)
        self.headers = {"Authorization": f"Bearer {self.token_file.read_text()}"}

    def in_app_ms(self) -> float | None:
        """Mean time inside the app per submit (its Prometheus histogram), queueing excluded."""
        text = httpx.get(f"{self.base}/metrics").text
        total = {k: float(v) for k, v in re.findall(
            r'shipyard_http_request_seconds_(sum|count)\{route="(?:/v1)?/jobs"\} ([0-9.e+-]+)', text)}
        return 1000 * total["sum"] / total["count"] if total.get("count") else None

    def stop(self) -> dict:
        self.proc.terminate()
        self.proc.wait(30)
        stats = Path(str(self.token_file) + ".stats")
        return json.loads(stats.read_text()) if stats.exists() else {}


def run_clients(target: Target, clients: int, plan) -> tuple[list[float], list[str], float, float, float]:
    """Start ``clients`` threads, each running ``plan(client, post) -> [latency]`` after a common
    barrier; returns latencies, errors, wall seconds, server and client CPU seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=target.base, headers=target.headers, timeout=60) as c:
            c.get("/healthz")  # connect before the clock starts

            def post() -> bool:
                try:
                    r = c.post("/v1/jobs", json=SPEC)
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    return False
                if r.status_code != 201:
                    with lock:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                return r.status_code == 201

            start.wait()
            mine = plan(i, post)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0, s0, c0 = time.perf_counter(), cpu_s(target.proc.pid), self_cpu_s()
    for t in threads:
        t.join()
    return (latencies, errors, time.perf_counter() - t0, cpu_s(target.proc.pid) - s0, self_cpu_s() - c0)


def closed_plan(per_client: int):
    def plan(_i, post) -> list[float]:
        out = []
        for _ in range(per_client):
            t = time.perf_counter()
            if post():
                out.append(time.perf_counter() - t)
        return out
    return plan


def open_plan(clients: int, rate: float, seconds: float):
    """Each client sends every ``clients / rate`` s from a random phase; latency from the schedule."""
    interval = clients / rate
    sends = max(1, int(seconds / interval))

    def plan(i, post) -> list[float]:
        rng = random.Random(i)
        t0 = time.perf_counter() + rng.random() * interval
        out = []
        for k in range(sends):
            due = t0 + k * interval
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if post():
                out.append(time.perf_counter() - due)
        return out
    return plan


def row(label: str, mode: str, clients: int, result, **extra) -> dict:
    latencies, errors, wall, server_cpu, client_cpu = result
    lat = sorted(latencies)
    n = len(lat)
    out = {"bench": "api_submit", "store": label, "mode": mode, "clients": clients, **extra, "submits": n,
           "errors": len(errors), "p50_ms": round(statistics.median(lat) * 1000, 1) if n else None,
           "p99_ms": round(percentile(lat, 0.99) * 1000, 1) if n else None,
           "max_ms": round(lat[-1] * 1000, 1) if n else None, "submits_per_s": round(n / wall, 1),
           "server_cpu_ms_per_submit": round(1000 * server_cpu / max(1, n), 2),
           "client_cpu_ms_per_submit": round(1000 * client_cpu / max(1, n), 2), "goal_p99_ms": GOAL_P99_MS}
    out["p99_vs_goal"] = round(out["p99_ms"] / GOAL_P99_MS, 2) if n else None
    out["meets_goal"] = bool(n) and out["p99_ms"] <= GOAL_P99_MS and not errors
    if errors:
        out["first_error"] = errors[0]
    return out


def measure(url: str, label: str, args) -> list[dict]:
    target = Target(url, label, args.tmp)
    rows = []
    try:
        run_clients(target, 4, closed_plan(10))  # warm up: imports, connection pool, caches
        rows.append(row(label, "closed", 1, run_clients(target, 1, closed_plan(100))))
        rows.append(row(label, "closed", args.clients, run_clients(target, args.clients, closed_plan(args.per_client))))
        rows[-1]["in_app_ms_per_submit"] = target.in_app_ms() and round(target.in_app_ms(), 2)
        for rate in args.rates:
            result = run_clients(target, args.clients, open_plan(args.clients, rate, args.open_s))
            rows.append(row(label, "open", args.clients, result, offered_per_s=rate))
    finally:
        stats = target.stop()
    if stats.get("commits"):
        for r in rows:
            r["server_jobs_per_commit"] = round(stats["jobs"] / stats["commits"], 2)  # over the whole run
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--rates", default="50,200", help="open-loop total offered loads, submits/s, comma-separated")
    ap.add_argument("--open-s", type=float, default=5.0, help="seconds per open-loop load")
    ap.add_argument("--stores", default="sqlite,postgresql")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    stores = args.stores.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp = Path(tmp)
        tmp.chmod(0o755)  # as root, PostgreSQL runs as `postgres` and must reach its directory
        if "sqlite" in stores:
            measure(f"sqlite:///{tmp / 'bench.db'}", "sqlite", args)
        if "postgresql" in stores:
            pg = tmp / "pg"
            script = REPO / "deploy" / "postgres.sh"
            url = subprocess.run(["bash", str(script), str(pg)], check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]
            try:
                measure(url, "postgresql", args)
            finally:
                subprocess.run(["bash", str(script), "stop", str(pg)], capture_output=True)


if __name__ == "__main__":
    main()
