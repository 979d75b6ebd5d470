"""`shipyard list`, `status` and `top` for scripts, against the session's shared server (a tenant
of this module's own): ``-o json`` and ``-o yaml`` parse and carry every full job id, ``list -q``
prints exactly the ids, a 40-column piped ``list`` keeps every id whole, a bad ``-o`` is one line
and exit 2.

The jobs ask for more CPUs than the session's Ray head has, so the scheduler keeps them QUEUED
("unschedulable": no reservation, nothing trains) and the test costs a few CLI calls."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from conftest import EXE, REPO, on_shared_server

pytestmark = pytest.mark.integration
JOB = str(REPO / "tests" / "integration" / "jobs" / "record_ids" / "job.yaml")


@pytest.fixture(scope="module")
def queued(shared_server, tmp_path_factory, digits_shards):
    """A tenant with three jobs that can never be placed: (tenant, their ids, newest first)."""
    base = tmp_path_factory.mktemp("cli-output")
    env = {"NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "SHIPYARD_HOME": str(base / "home")}
    tenant = on_shared_server(shared_server, env, roots=(base,), read_only=(digits_shards,))
    ids = []
    for n in range(3):
        r = cli(tenant, "submit", "-f", JOB, "--set", f"dataset.uri={digits_shards / 'train'}",
                "--set", f"checkpoint.uri={base / f'ck{n}'}", "--set", "workers.cpus=64", "--set", f"name=never-{n}")
        assert r.returncode == 0, r.stdout + r.stderr
        ids.append(r.stdout.strip())
    yield tenant, ids[::-1]
    tenant.cancel_active()


def cli(tenant, *args, columns: int = 200):
    """The real `shipyard` command, stdout piped, as this tenant."""
    env = {**os.environ, **tenant.env, "SHIPYARD_URL": tenant.url, "SHIPYARD_TOKEN": tenant.token,
           "COLUMNS": str(columns)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60)


def test_list_for_scripts_json_yaml_and_ids_only(queued):
    tenant, ids = queued
    r = cli(tenant, "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [j["id"] for j in doc["items"]] == ids and {j["state"] for j in doc["items"]} == {"QUEUED"}
    r = cli(tenant, "list", "-o", "yaml")
    assert r.returncode == 0 and [j["id"] for j in yaml.safe_load(r.stdout)["items"]] == ids, r.stderr
    r = cli(tenant, "list", "-q")
    assert (r.returncode, r.stdout.splitlines()) == (0, ids), r.stderr
    r = cli(tenant, "list", "-q", "--state", "RUNNING")
    assert (r.returncode, r.stdout) == (0, "")


def test_a_40_column_piped_list_keeps_every_id_whole(queued):
    tenant, ids = queued
    for args in ((), ("-o", "wide"), ("--state", "QUEUED")):
        r = cli(tenant, "list", *args, columns=40)
        assert r.returncode == 0, r.stderr
        assert all(i in r.stdout for i in ids), r.stdout
        rows = [line for line in r.stdout.splitlines() if any(i in line for i in ids)]
        assert len(rows) == len(ids), r.stdout  # one line per job: nothing folded at 40 (or 80) columns
    r = cli(tenant, "top", "--all", "--once", columns=40)
    assert r.returncode == 0 and all(i in r.stdout for i in ids), r.stdout + r.stderr


def test_status_and_top_as_json_and_yaml(queued):
    tenant, ids = queued
    from shipyard.client import Client

    with Client(tenant.url, tenant.token) as c:  # the scheduler (a tick every 0.5 s) says why it waits
        deadline = time.monotonic() + 30
        while not c.get(ids[0])["waiting"] and time.monotonic() < deadline:
            time.sleep(0.5)
    r = cli(tenant, "status", ids[0], "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["id"], doc["state"], doc["preempted_by"]) == (ids[0], "QUEUED", None)
    assert doc["waiting"].startswith("unschedulable: needs 128 CPUs"), doc["waiting"]
    assert yaml.safe_load(cli(tenant, "status", ids[0], "-o", "yaml").stdout)["id"] == ids[0]
    r = cli(tenant, "status", ids[0], columns=40)
    assert r.returncode == 0 and r.stdout.startswith(f"{ids[0]} never-2 "), r.stdout
    assert any(line.startswith("  waiting: unschedulable: needs 128 CPUs") for line in r.stdout.splitlines()), r.stdout
    r = cli(tenant, "top", "--all", "-o", "json")  # one snapshot, then exit
    assert r.returncode == 0, r.stderr
    assert {j["id"] for j in json.loads(r.stdout)["items"]} == set(ids)
    r = cli(tenant, "top", "--all", "-o", "yaml")
    assert r.returncode == 0 and {j["id"] for j in yaml.safe_load(r.stdout)["items"]} == set(ids)


@pytest.mark.parametrize("command", [["list"], ["status", "job-000000000000"], ["top"]])
def test_a_bad_output_format_exits_2_with_one_line(queued, command):
    tenant, _ = queued
    r = cli(tenant, *command, "-o", "xml")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == ["error: -o/--output: got 'xml'; expected one of table, wide, json, yaml"]
