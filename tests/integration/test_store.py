"""The job store against real databases: a SQLite file and a PostgreSQL server (deploy/postgres.sh).

Every test gets an empty database (``fresh_database_url``) and runs once per backend.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from shipyard.run.records import DriverReport
from shipyard.errors import UserError
from shipyard.spec import spec_from_dict
from shipyard.store import (IllegalTransition, JobNotFound, JobState, StaleTransition, Store, StoreError,
                            TenantInUse, TenantNotFound)
from shipyard.store.migrate import head_revision
from shipyard.store.models import Base

S = JobState
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def spec(name="train", gpus=0.0):
    return spec_from_dict({"name": name, "entrypoint": "train.py:train", "dataset": {"uri": "/data/digits"},
                           "workers": {"count": 2, "gpus": gpus}})


@pytest.fixture
def store(fresh_database_url):
    with Store.open(fresh_database_url) as s:
        s.create_tenant("a", max_gpus=8)
        s.create_tenant("b")
        yield s


# -- schema ---------------------------------------------------------------------------------

def test_migrations_build_the_schema_on_an_empty_database_and_reopen_is_a_no_op(fresh_database_url):
    with Store.open(fresh_database_url) as s:
        tables = set(inspect(s.engine).get_table_names())
        assert {"tenants", "tokens", "jobs", "attempts", "events", "metrics", "alembic_version"} <= tables
        s.create_tenant("a")
        job = s.add_job("a", spec())
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head_revision()
            # The typed models describe exactly what the migrations built.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    for _ in range(2):
        with Store.open(fresh_database_url) as s:
            assert s.get_job(job.id).name == "train"
            with s.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_unusable_urls_are_user_errors_naming_the_problem(tmp_path):
    with pytest.raises(StoreError, match="unsupported database"):
        Store.open("mysql://x@localhost/db")
    with pytest.raises(StoreError, match="in-memory"):
        Store.open("sqlite://")
    with pytest.raises(StoreError, match="cannot connect"):
        Store.open("postgresql://nobody:secret@127.0.0.1:1/none")
    with Store.open(data_dir=tmp_path / "data") as s:  # default: a SQLite file in the data dir
        assert (tmp_path / "data" / "shipyard.db").exists() and "sqlite" in s.url


# -- jobs -----------------------------------------------------------------------------------

def test_added_job_is_queued_and_readable_by_a_new_connection(store, fresh_database_url):
    job = store.add_job("a", spec(gpus=1), priority=5, now=T0)
    with Store.open(fresh_database_url) as other:  # what another process sees after add_job returned
        got = other.get_job(job.id)
    assert (got.state, got.priority, got.tenant, got.submitted_at) == (S.QUEUED, 5, "a", T0)
    assert got.spec["workers"] == {"count": 2, "cpus": 1.0, "gpus": 1.0, "memory": None, "pool": None,
                                   "min": None, "max": None, "resize_interval_s": 60.0}
    assert [e.kind for e in store.events(job.id)] == ["submitted"]


def test_unknown_tenant_and_unknown_job_are_not_found(store):
    with pytest.raises(TenantNotFound):
        store.add_job("nobody", spec())
    assert store.list_jobs().items == []
    with pytest.raises(JobNotFound):
        store.get_job("job-000000000000")


def test_another_tenants_job_is_not_found_so_ids_do_not_leak(store):
    job = store.add_job("a", spec())
    assert store.get_job(job.id, tenant="a").id == job.id
    with pytest.raises(JobNotFound):
        store.get_job(job.id, tenant="b")


def test_list_filters_by_state_name_and_tenant(store):
    ids = {}
    for i, (tenant, name) in enumerate([("a", "x"), ("a", "y"), ("b", "x"), ("b", "z")]):
        ids[tenant, name] = store.add_job(tenant, spec(name), now=T0 + timedelta(seconds=i)).id
    store.transition(ids["a", "y"], S.QUEUED, S.ADMITTED)
    assert {j.id for j in store.list_jobs(name="x").items} == {ids["a", "x"], ids["b", "x"]}
    assert [j.id for j in store.list_jobs(tenant="b").items] == [ids["b", "z"], ids["b", "x"]]
    assert [j.id for j in store.list_jobs(states=["admitted"]).items] == [ids["a", "y"]]
    assert [j.id for j in store.list_jobs(states=[S.QUEUED], tenant="a").items] == [ids["a", "x"]]
    assert [j.id for j in store.active_jobs()] == list(ids.values())  # submission order
    with pytest.raises(UserError, match="unknown job state"):
        store.list_jobs(states=["DONE"])


def test_pagination_is_newest_first_and_stable_while_jobs_arrive(store):
    ids = [store.add_job("a", spec(f"j{i}")).id for i in range(7)]
    first = store.list_jobs(limit=3)
    assert [j.id for j in first.items] == ids[6:3:-1] and first.next_cursor
    store.add_job("a", spec("late"))  # must not shift the following pages
    second = store.list_jobs(limit=3, cursor=first.next_cursor)
    third = store.list_jobs(limit=3, cursor=second.next_cursor)
    assert [j.id for j in second.items] == ids[3:0:-1]
    assert [j.id for j in third.items] == ids[:1] and third.next_cursor is None
    with pytest.raises(UserError, match="limit"):
        store.list_jobs(limit=0)
    with pytest.raises(UserError, match="cursor"):
        store.list_jobs(cursor="abc")


# -- transitions ----------------------------------------------------------------------------

def test_a_job_lifecycle_records_times_handle_and_a_state_event_per_step(store):
    j = store.add_job("a", spec(), now=T0)
    store.transition(j.id, S.QUEUED, S.ADMITTED, backend_handle="raysubmit_1", now=T0 + timedelta(seconds=1))
    store.transition(j.id, S.ADMITTED, S.RUNNING, now=T0 + timedelta(seconds=2))
    store.transition(j.id, S.RUNNING, S.RESTARTING, cause="worker-died", now=T0 + timedelta(seconds=3))
    store.transition(j.id, S.RESTARTING, S.RUNNING, now=T0 + timedelta(seconds=4))
    done = store.transition(j.id, S.RUNNING, S.SUCCEEDED, now=T0 + timedelta(seconds=9))
    assert done.started_at == T0 + timedelta(seconds=2)  # the first start, not the restart
    assert done.ended_at == T0 + timedelta(seconds=9) and done.backend_handle == "raysubmit_1"
    trail = [e.message for e in store.events(j.id, kind="state")]
    assert trail == ["QUEUED -> ADMITTED", "ADMITTED -> RUNNING", "RUNNING -> RESTARTING (worker-died)",
                     "RESTARTING -> RUNNING", "RUNNING -> SUCCEEDED"]


def test_illegal_and_stale_transitions_are_rejected_and_change_nothing(store):
    j = store.add_job("a", spec())
    with pytest.raises(IllegalTransition, match="QUEUED and cannot become RUNNING"):
        store.transition(j.id, S.QUEUED, S.RUNNING)
    store.transition(j.id, S.QUEUED, S.CANCELLED, cause="user")
    with pytest.raises(StaleTransition, match="is CANCELLED, not QUEUED"):
        store.transition(j.id, S.QUEUED, S.ADMITTED)  # a scheduler acting on an old snapshot
    with pytest.raises(JobNotFound):
        store.transition("job-ffffffffffff", S.QUEUED, S.ADMITTED)
    after = store.get_job(j.id)
    assert after.state is S.CANCELLED and after.cause == "user"
    assert len(store.events(j.id, kind="state")) == 1


def test_preempted_job_is_requeued_keeping_its_progress_and_place(store):
    j = store.add_job("a", spec(), now=T0)
    store.transition(j.id, S.QUEUED, S.ADMITTED, backend_handle="h1")
    store.transition(j.id, S.ADMITTED, S.RUNNING)
    store.update_job(j.id, last_step=1200, progress=0.4)
    store.transition(j.id, S.RUNNING, S.PREEMPTED, cause="preempted", message="for job-x (priority 9)")
    back = store.transition(j.id, S.PREEMPTED, S.QUEUED)
    assert (back.state, back.last_step, back.progress, back.submitted_at) == (S.QUEUED, 1200, 0.4, T0)
    assert back.backend_handle is None  # the stopped run's handle is gone


def test_concurrent_writers_one_wins_the_compare_and_set(store):
    """The API cancelling while the scheduler admits: exactly one of them moves the job."""
    for _ in range(5):
        j = store.add_job("a", spec())
        barrier = threading.Barrier(8)

        def attempt(i):
            barrier.wait()
            try:
                store.transition(j.id, S.QUEUED, S.CANCELLED if i % 2 else S.ADMITTED)
                return "won"
            except StaleTransition:
                return "stale"

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(8)))
        assert results.count("won") == 1, results
        assert len(store.events(j.id, kind="state")) == 1


def test_concurrent_submissions_and_attempts_all_land(store):
    def submit(i):
        return [store.add_job("a" if i % 2 else "b", spec(f"t{i}-{k}")).id for k in range(15)]

    with ThreadPoolExecutor(8) as pool:
        ids = [x for batch in pool.map(submit, range(8)) for x in batch]
    assert len(set(ids)) == 120
    assert len(store.list_jobs(limit=1000).items) == 120
    target = ids[0]
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda _: store.start_attempt(target).number, range(8)))
    assert sorted(numbers) == list(range(1, 9))


# -- attempts, events, metrics --------------------------------------------------------------

def test_attempts_and_events_are_recorded(store):
    j = store.add_job("a", spec())
    a1 = store.start_attempt(j.id, now=T0)
    store.update_job(j.id, last_step=100)
    store.end_attempt(j.id, a1.number, cause="node-lost", last_step=137, steps_lost=37, now=T0 + timedelta(60))
    a2 = store.start_attempt(j.id)
    assert (a1.number, a2.number, a2.last_step) == (1, 2, 100)  # attempt 2 resumes from the checkpoint
    with pytest.raises(UserError, match="already ended"):
        store.end_attempt(j.id, 1, cause="again")
    first = store.attempts(j.id)[0]
    assert (first.cause, first.steps_lost, first.ended_at) == ("node-lost", 37, T0 + timedelta(60))
    store.add_event(j.id, "checkpoint", "step 200 committed")
    assert [e.message for e in store.events(j.id, kind="attempt")] == [
        "attempt 1 started", "attempt 1 ended: node-lost, 37 steps lost", "attempt 2 started from step 100"]
    assert store.events(j.id, kind="checkpoint")[0].message == "step 200 committed"
    with pytest.raises(JobNotFound):
        store.add_event("job-ffffffffffff", "x", "y")


def test_metrics_append_and_query(store):
    j = store.add_job("a", spec())
    for step in range(1, 6):
        store.append_metrics(j.id, step * 10, {"loss": 1.0 / step, "lr": 0.1})
    store.append_metrics(j.id, 60, {"loss": float("nan")})
    assert [p.step for p in store.metrics(j.id, since_step=30)] == [30, 40, 50, 60]
    assert [p.values for p in store.metrics(j.id, names=["lr"])][-1] == {"lr": 0.1}
    assert store.latest_metrics(j.id) == {"loss": None, "lr": 0.1}  # a diverged loss shows as a gap
    with pytest.raises(UserError, match="metric 'acc'"):
        store.append_metrics(j.id, 70, {"acc": "high"})


def test_a_report_past_the_limit_keeps_recent_rows_and_averages_older_ones(store):
    """store/metrics.py's downsampling on this backend, inside the report's transaction."""
    from shipyard.store.metrics import OLD_BUCKETS, RECENT_POINTS

    j = store.add_job("a", spec())
    points = [{"step": s, "at": 1.7e9 + s, "values": {"loss": 1.0, **({"eval": 2.0} if s % 500 == 0 else {})}}
              for s in range(3000)]
    store.record_report(j.id, "run-1", DriverReport(schema=2, step=2999, metrics=points))
    series = store.metrics(j.id)
    assert len(series) <= OLD_BUCKETS + RECENT_POINTS
    assert [p.step for p in series[-RECENT_POINTS:]] == list(range(2800, 3000))
    assert series[0].step == 0 and all(p.values["loss"] == 1.0 for p in series)
    assert [p.values["eval"] for p in series if "eval" in p.values] == [2.0] * 6  # steps 0, 500, ..., 2500


# -- tenants and tokens ---------------------------------------------------------------------

def test_tokens_are_stored_hashed_and_can_be_revoked(store):
    secret, tok = store.create_token("a", admin=True, label="ci")
    assert store.authenticate(secret) == tok and tok.admin
    assert store.authenticate(secret + "x") is None and store.authenticate("nope") is None
    with store.engine.connect() as conn:
        assert secret not in str(conn.execute(text("SELECT * FROM tokens")).all())
    store.revoke_token(tok.id)
    assert store.authenticate(secret) is None
    with pytest.raises(TenantNotFound):
        store.create_token("nobody")


def test_tenant_quotas_crud_and_delete_refused_while_jobs_exist(store):
    assert store.get_tenant("a").max_gpus == 8
    t = store.set_quotas("a", max_running_jobs=2)
    assert (t.max_gpus, t.max_running_jobs) == (8, 2)
    assert store.set_quotas("a", max_gpus=None).max_gpus is None
    with pytest.raises(UserError, match="max_cpus"):
        store.set_quotas("a", max_cpus=-1)
    assert store.create_tenant("a", exist_ok=True).name == "a"
    store.add_job("a", spec())
    with pytest.raises(TenantInUse):
        store.delete_tenant("a")
    store.create_token("b")
    store.delete_tenant("b")
    assert [t.name for t in store.list_tenants()] == ["a"] and store.list_tokens("b") == []


# -- group commit and the token cache -------------------------------------------------------

def test_a_batch_of_submissions_is_one_commit_and_a_bad_one_fails_alone(store, fresh_database_url):
    from shipyard.store.submits import GroupCommit, Submission

    body = spec().model_dump(mode="json")
    subs = [Submission(t, "train", body, 0, T0) for t in ("a", "nobody", "b")]
    subs.append(Submission("a", "train", body, 0, T0, id=subs[0].id))  # a duplicate id: the batch fails
    commits = GroupCommit(store._writer)
    for s in subs:
        assert s.future.set_running_or_notify_cancel()
    commits._commit(subs)  # as the writer thread does with what it found queued
    first = subs[0].future.result()
    assert first.state is S.QUEUED and first.seq > 0
    with pytest.raises(TenantNotFound):
        subs[1].future.result()
    assert subs[2].future.result().tenant == "b"
    assert subs[3].future.exception() is not None  # the duplicate alone failed, retried on its own
    with Store.open(fresh_database_url) as other:
        assert other.get_job(first.id).tenant == "a" and other.get_job(subs[2].id).tenant == "b"
        assert [e.kind for e in other.events(first.id)] == ["submitted"]


def test_concurrent_add_jobs_share_commits_and_each_returns_its_own_job(store):
    with ThreadPoolExecutor(32) as pool:
        jobs = list(pool.map(lambda i: store.add_job("a", spec(f"g{i}"), priority=i % 3), range(200)))
    assert sorted(j.name for j in jobs) == sorted(f"g{i}" for i in range(200))
    assert len({j.seq for j in jobs}) == 200
    for j in jobs[:20]:
        got = store.get_job(j.id)
        assert (got.name, got.priority, got.seq) == (j.name, j.priority, j.seq)
    assert store._submits.jobs == 200 and store._submits.batches <= 200


def test_cached_tokens_stop_working_at_once_when_revoked_here_and_within_max_age_elsewhere(store,
                                                                                          fresh_database_url):
    import time

    secret, tok = store.create_token("a")
    assert store.authenticate(secret, max_age_s=60) == tok
    store.revoke_token(tok.id)  # through this store: the cache is dropped
    assert store.authenticate(secret, max_age_s=60) is None
    secret, tok = store.create_token("a")
    with Store.open(fresh_database_url) as other:  # `shipyard admin` in another process (opened first:
        assert store.authenticate(secret, max_age_s=2) == tok  # opening a store may take longer than the TTL)
        other.revoke_token(tok.id)
        assert store.authenticate(secret, max_age_s=2) == tok  # still cached
    time.sleep(2.1)
    assert store.authenticate(secret, max_age_s=2) is None
    assert store.authenticate(secret, max_age_s=2) is None  # revoked answers are never cached
