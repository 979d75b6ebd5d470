"""Bad inputs fail in seconds with one line, before Ray starts (`shipyard run`) or at submit (the
server): a missing function, a storage endpoint nothing answers at, a bucket that does not exist,
a dataset that is not there. Each case prints its time (the note quotes them); the bound asserted
is generous (15 s) and only there to catch a return of the old minute-long silence."""

from __future__ import annotations

import time

import pytest

from conftest import REPO, free_port, on_shared_server
from test_server import cli

pytestmark = pytest.mark.integration
DIGITS = str(REPO / "jobs" / "digits" / "job.yaml")


def one_line_error(r) -> str:
    """The run's single ``error:`` line (stderr), checking there is no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def timed(shipyard, *args, env=None):
    t0 = time.monotonic()
    r = shipyard(*args, env=env, timeout=120)
    return r, time.monotonic() - t0


def test_run_names_a_missing_function_before_ray_starts(shipyard, digits_shards, tmp_path):
    r, took = timed(shipyard, "run", DIGITS, "--set", "entrypoint=train.py:trian",
                    "--set", f"dataset.uri={digits_shards / 'train'}", "--set", f"checkpoint.uri={tmp_path / 'ck'}")
    print(f"preflight run, missing function: {took:.1f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert one_line_error(r) == ("error: entrypoint: train.py defines no 'trian' at its top level "
                                 "(its functions: make_model, evaluate, train)")
    assert not (tmp_path / "ck").exists() and took < 15


@pytest.mark.parametrize("case", ["refused", "no such bucket"])
def test_run_names_an_unusable_storage_endpoint_or_bucket(case, shipyard, s3_endpoint, bucket, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}" if case == "refused" else s3_endpoint
    name = bucket if case == "refused" else "no-such-bucket-here"
    r, took = timed(shipyard, "run", DIGITS, "--set", f"dataset.uri=s3://{name}/digits/train",
                    "--set", "dataset.eval_uri=null", "--set", f"checkpoint.uri={tmp_path / 'ck'}",
                    env={"SHIPYARD_S3_ENDPOINT": endpoint})
    print(f"preflight run, {case}: {took:.1f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_line_error(r)
    assert line.startswith(f"error: dataset.uri: s3://{name}/digits/train: bucket {name!r} at {endpoint}: {case}"), line
    assert took < 15


@pytest.fixture
def tenant(shared_server, tmp_path, cli_env, digits_shards):
    tenant = on_shared_server(shared_server, cli_env, roots=(tmp_path,), read_only=(digits_shards,))
    yield tenant
    tenant.cancel_active()


def test_submit_refuses_a_missing_function_and_a_missing_dataset_with_one_line(tenant, digits_shards, tmp_path):
    common = ["submit", "-f", DIGITS, "--set", f"checkpoint.uri={tmp_path / 'ck'}", "--set", "dataset.eval_uri=null"]
    t0 = time.monotonic()
    r = cli(tenant, *common, "--set", f"dataset.uri={digits_shards / 'train'}", "--set", "entrypoint=train.py:trian")
    print(f"preflight submit, missing function: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "entrypoint: train.py defines no 'trian' at its top level (its functions: make_model, evaluate, train)" in one_line_error(r)

    t0 = time.monotonic()
    r = cli(tenant, *common, "--set", f"dataset.uri={tmp_path / 'nothing-here'}")
    print(f"preflight submit, missing dataset: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"dataset.uri: {tmp_path / 'nothing-here'}" in one_line_error(r)
    from shipyard.client import Client

    with Client(tenant.url, tenant.token) as c:
        assert list(c.iter_jobs()) == []  # nothing was queued
