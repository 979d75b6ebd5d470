"""Sharing one server: storage scopes per tenant, idempotent submits, fair preemption and quotas.

The API runs over a SQLite store through FastAPI's TestClient with a storage policy like a real
server's (default root per tenant, a shared read-only datasets root); nothing reaches Ray."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.api.intake import StoragePolicy
from shipyard.errors import SpecError
from shipyard.scheduler import decide
from shipyard.scheduler.snapshot import JobRequest, Quota, Resources, RunningJob, Snapshot
from shipyard.scopes import ROOTS_ENV, ScopeError, StorageRoot, check_from_env, to_env
from shipyard.spec import spec_from_dict
from shipyard.store import Store

ROOT = "s3://team-bucket/tenants"
SHARED = "s3://datasets/common"


def spec(**extra):
    body = {"name": "train", "entrypoint": "train:train", "dataset": {"uri": f"{ROOT}/a/data"},
            "checkpoint": {"uri": f"{ROOT}/a/ck"}, "workers": {"count": 2, "cpus": 1}}
    for path, value in extra.items():
        node = body
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return body


@pytest.fixture
def api(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'shipyard.db'}")
    store.create_tenant("a")
    store.create_tenant("b")
    store.create_tenant("ab")
    policy = StoragePolicy(ROOT, (StorageRoot(SHARED, writable=False),), allow_local=False)
    client = TestClient(create_app(store, config=ApiConfig(report_key=b"k", storage=policy)))
    client.tokens = {t: store.create_token(t)[0] for t in ("a", "b", "ab")}
    client.store = store
    yield client
    store.close()


def post(api, body, who="a", **headers):
    return api.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {api.tokens[who]}", **headers})


def refused(r, status, *words):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_a_job_inside_its_roots_is_accepted_and_may_read_the_shared_root(api):
    assert post(api, spec()).status_code == 201
    assert post(api, spec(dataset__uri=f"{SHARED}/digits", dataset__eval_uri=f"{SHARED}/digits-test")).status_code == 201


ESCAPES = [
    f"{ROOT}/b/ck",                      # another tenant's root
    f"{ROOT}/ab/ck",                     # a tenant whose name starts with "a": whole segments only
    f"{ROOT}/a/../b/ck",                 # '..' segments
    f"{ROOT}/a/./ck",
    f"{ROOT}/a//ck",
    f"{ROOT}/a/%2e%2e/b/ck",             # URL-encoded tricks
    f"{ROOT}/a%2F..%2Fb/ck",
    f"{ROOT}/a\\..\\b",
    "s3://TEAM-BUCKET/tenants/a/ck",     # not a bucket name: no case games
    "/root/.shipyard/server/ck",         # the server's data dir
    "file:///",
    "file:///etc",
    "relative/ck",
    "gs://team-bucket/tenants/a/ck",
    "http://169.254.169.254/latest",
]


@pytest.mark.parametrize("uri", ESCAPES)
@pytest.mark.parametrize("field", ["dataset__uri", "dataset__eval_uri", "checkpoint__uri"])
def test_every_uri_field_outside_the_tenants_roots_is_refused_and_nothing_is_stored(api, field, uri):
    r = post(api, spec(**{field: uri}))
    assert r.status_code in (403, 422), r.text
    assert field.replace("__", ".") in r.json()["error"]["message"]
    assert sum(api.store.count_jobs().values()) == 0


def test_the_shared_root_is_read_only_and_the_refusal_names_the_allowed_roots(api):
    message = refused(post(api, spec(checkpoint__uri=f"{SHARED}/ck")), 403, "checkpoint.uri", "read-only")
    assert f"{ROOT}/a/" in message
    message = refused(post(api, spec(checkpoint__uri=f"{ROOT}/b/ck")), 403, "outside your tenant's storage roots")
    assert f"{ROOT}/a/" in message and f"{ROOT}/b" not in message.split("allowed")[1]


def test_tensorboard_needs_a_directory_under_a_root_on_a_shared_server(api):
    refused(post(api, spec(metrics__tensorboard=True)), 422, "metrics.tensorboard_dir")
    refused(post(api, spec(metrics__tensorboard=True, metrics__tensorboard_dir="/tmp/tb")), 422,
            "metrics.tensorboard_dir", "local paths")


def test_granted_roots_and_local_storage_only_where_the_admin_allows(api, tmp_path):
    api.store.set_storage("b", [(f"{ROOT}/a/shared-with-b", False)])
    api.app.state.__dict__.pop("tenant_cache", None)
    assert post(api, spec(dataset__uri=f"{ROOT}/a/shared-with-b/d", checkpoint__uri=f"{ROOT}/b/ck"), "b").status_code == 201
    refused(post(api, spec(dataset__uri=f"{ROOT}/a/data", checkpoint__uri=f"{ROOT}/b/ck"), "b"), 403, "dataset.uri")


def test_local_roots_resolve_symlinks_before_matching(tmp_path):
    root = tmp_path / "roots" / "a"
    (root / "data").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "link")
    roots = [StorageRoot(str(root))]
    from shipyard.scopes import check_spec

    ok = spec_from_dict({**spec(), "dataset": {"uri": str(root / "data")}, "checkpoint": {"uri": str(root / "ck")}})
    check_spec(ok, roots, allow_local=True)
    escape = spec_from_dict({**spec(), "dataset": {"uri": str(root / "link" / "d")}, "checkpoint": {"uri": str(root / "ck")}})
    with pytest.raises(ScopeError, match="dataset.uri"):
        check_spec(escape, roots, allow_local=True)
    with pytest.raises(SpecError, match="does not allow local paths"):
        check_spec(ok, roots, allow_local=False)


def test_the_driver_checks_the_spec_again_against_the_roots_the_server_handed_it():
    roots = [StorageRoot(f"{ROOT}/a")]
    env = {ROOTS_ENV: to_env(roots, allow_local=False)}
    check_from_env(spec_from_dict(spec()), env)
    changed = spec_from_dict(spec(checkpoint__uri=f"{ROOT}/b/ck"))
    with pytest.raises(ScopeError, match="checkpoint.uri"):
        check_from_env(changed, env)
    check_from_env(changed, {})  # `shipyard run` on one's own machine: no roots, no check


def test_the_server_never_takes_a_workdir_from_its_own_disk(api):
    refused(post(api, spec(workdir="/srv/shipyard/server")), 422, "workdir", "uploads the workdir")


def test_a_retried_submit_with_the_same_idempotency_key_returns_the_first_job(api):
    first = post(api, spec(), **{"Idempotency-Key": "k-1"})
    again = post(api, spec(), **{"Idempotency-Key": "k-1"})
    other = post(api, spec(), **{"Idempotency-Key": "k-2"})
    assert first.status_code == again.status_code == other.status_code == 201
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    # Keys are per tenant: another tenant's same key is its own job.
    theirs = post(api, spec(dataset__uri=f"{ROOT}/b/d", checkpoint__uri=f"{ROOT}/b/ck"), "b", **{"Idempotency-Key": "k-1"})
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert sum(api.store.count_jobs().values()) == 3
    refused(post(api, spec(), **{"Idempotency-Key": "no spaces allowed"}), 400, "Idempotency-Key")


def test_concurrent_submits_with_one_key_store_one_job(api):
    futures = [api.store.submit_job("a", spec_from_dict(spec()), idempotency_key="same") for _ in range(20)]
    ids = {f.result(10).id for f in futures}
    assert len(ids) == 1 and sum(api.store.count_jobs().values()) == 1


# -- fair play in the scheduler -------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def job(id, tenant, prio=0, t=0, cpus=1.0, workers=1):
    return JobRequest(id, tenant, prio, T0 + timedelta(seconds=t), workers, Resources(cpus, 0, 0))


def test_a_users_priority_cannot_preempt_another_tenants_job():
    running = (RunningJob(job("theirs", "b", prio=0, cpus=4), "RUNNING", T0),)
    snap = Snapshot.aggregate(Resources(0, 0, 0), Resources(4, 0, 0), queued=(job("mine", "a", prio=1000, cpus=4),),
                              running=running)
    d = decide(snap)
    assert d.preempt == [] and d.admit == []
    # An admin's tenant priority may.
    d = decide(Snapshot.aggregate(Resources(0, 0, 0), Resources(4, 0, 0), queued=snap.queued, running=running,
                                  tenant_priority={"a": 10}))
    assert d.preempt == ["theirs"] and "tenant a's priority 10 > tenant b's 0" in d.reasons["theirs"]
    # Within a tenant, the job priority still decides.
    own = (RunningJob(job("old", "a", prio=0, cpus=4), "RUNNING", T0),)
    assert decide(Snapshot.aggregate(Resources(0, 0, 0), Resources(4, 0, 0), queued=snap.queued, running=own)).preempt == ["old"]


def test_a_users_priority_reorders_only_its_own_tenants_slots_in_the_queue():
    q = (job("b-early", "b", t=0, cpus=2), job("a-late-urgent", "a", prio=1000, t=5, cpus=2),
         job("a-early", "a", t=1, cpus=2))
    from shipyard.scheduler.queue import order

    assert [j.id for j in order(q)] == ["b-early", "a-late-urgent", "a-early"]
    assert [j.id for j in order(q, {"a": 1})] == ["a-late-urgent", "a-early", "b-early"]


def test_fractional_cpus_are_rounded_up_per_worker_for_quotas():
    many = job("dust", "a", cpus=1e-6, workers=4096)
    snap = Snapshot.aggregate(Resources(8192, 0, 0), Resources(8192, 0, 0), queued=(many,),
                              quotas={"a": Quota(max_cpus=16)})
    assert decide(snap).reasons["dust"] == "quota: job needs 4096 CPUs, more than tenant a's limit of 16"
