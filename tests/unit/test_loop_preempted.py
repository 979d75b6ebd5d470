"""The scheduler loop's end of a preemption, over a SQLite store and a fake backend: a stopped
run is requeued, but a run that finished before the stop reached it is SUCCEEDED, not rerun.

"Finished" is the driver's explicit outcome, not an attempt that happens to end ``finished``: an
attempt Ray Train opened after the stop (the driver reports it once it has a kind) may end so
without the job having trained to the end."""

from __future__ import annotations

import time

import pytest

from shipyard.backends.base import BackendStatus, State
from shipyard.run.records import DriverReport, RunOutcome
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.store import JobState, Store

S = JobState
TOTAL = 460
SPEC = {"name": "p", "entrypoint": "train.py:train", "dataset": {"uri": "/d"}, "workers": {"count": 2, "cpus": 1},
        "checkpoint": {"uri": "/ck", "every_steps": 10}}


class Backend:
    name = "fake"

    def __init__(self):
        self.cancelled: list[str] = []

    def cancel(self, handle: str) -> None:
        self.cancelled.append(handle)


@pytest.fixture
def store(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 's.db'}") as s:
        s.create_tenant("a")
        yield s


def preempted_job(store: Store, kinds_and_steps, outcome: RunOutcome | None = None, step: int | None = None):
    """A job preempted while running as run-1, whose driver reported these attempts (and outcome)."""
    job = store.add_job("a", SPEC)
    store.transition(job.id, S.QUEUED, S.ADMITTED)
    store.transition(job.id, S.ADMITTED, S.RUNNING, backend_handle="run-1")
    now = time.time()
    attempts, start = [], 0
    for n, (kind, last) in enumerate(kinds_and_steps, 1):
        attempts.append({"number": n, "start": now - 10 + n, "end": now - 9 + n, "kind": kind, "start_step": start,
                         "last_step": last, "committed_step": last, "steps_lost": 0})
        start = last
    store.record_report(job.id, "run-1", report(step=step if step is not None else kinds_and_steps[-1][1],
                                                attempts=attempts, outcome=outcome))
    return store.transition(job.id, S.RUNNING, S.PREEMPTED, cause="preempted")


def report(outcome: RunOutcome | None = None, **fields) -> DriverReport:
    kind = None if outcome is None else {"kind": outcome, "ok": outcome is RunOutcome.FINISHED}
    return DriverReport(schema=2, total=TOTAL, outcome=kind, **fields)


def follow(store, job, ray_state=State.STOPPED):
    SchedulerLoop(store, Backend())._follow(store.get_job(job.id), BackendStatus(ray_state, "Stopped"))
    return store.get_job(job.id)


def last_state_event(store, job):
    return store.events(job.id, kind="state")[-1].message


def test_a_preempted_run_that_stopped_after_its_checkpoint_is_requeued(store):
    job = preempted_job(store, [("preempted", 81)], RunOutcome.PREEMPTED)
    got = follow(store, job)
    assert (got.state, got.backend_handle, got.cause) == (S.QUEUED, None, "preempted")


@pytest.mark.parametrize("ray_state", [State.STOPPED, State.SUCCEEDED])
def test_a_preempted_run_whose_driver_says_it_finished_is_succeeded_not_requeued(store, ray_state):
    # Ray reports STOPPED for a run it was asked to stop even when the driver exited 0; the
    # driver's outcome says what happened.
    job = preempted_job(store, [("finished", TOTAL)], RunOutcome.FINISHED)
    got = follow(store, job, ray_state)
    assert got.state is S.SUCCEEDED and got.ended_at is not None
    assert last_state_event(store, job).startswith("PREEMPTED -> SUCCEEDED (finished)")


def test_an_attempt_that_ended_finished_after_the_stop_does_not_make_a_stopped_run_succeeded(store):
    # The race: attempt 1 was preempted at step 81; Ray Train started attempt 2, which the driver
    # saw end "finished" at step 95 of 460 while it was stopping. The driver's word: stopped.
    job = preempted_job(store, [("preempted", 81), ("finished", 95)], RunOutcome.STOPPED)
    got = follow(store, job)
    assert got.state is S.QUEUED, last_state_event(store, job)
    assert last_state_event(store, job).startswith("PREEMPTED -> QUEUED (preempted)")


@pytest.mark.parametrize("outcome", [RunOutcome.PREEMPTED, RunOutcome.STOPPED, RunOutcome.FAILED])
def test_the_drivers_outcome_decides_over_an_attempt_kind_and_rays_state(store, outcome):
    job = preempted_job(store, [("finished", TOTAL)], outcome)
    assert follow(store, job, State.SUCCEEDED).state is S.QUEUED


def test_without_an_outcome_a_finished_attempt_counts_only_at_the_final_step(store):
    # A driver whose last report was lost (or older than the typed outcome): its last attempt
    # must have reached the total to count as finished.
    short = preempted_job(store, [("preempted", 5), ("finished", 6)])
    assert follow(store, short).state is S.QUEUED
    done = preempted_job(store, [("finished", TOTAL)])
    assert follow(store, done).state is S.SUCCEEDED


def test_a_new_runs_outcome_is_not_read_from_the_previous_run(store):
    job = preempted_job(store, [("finished", TOTAL)], RunOutcome.FINISHED)
    assert store.run_outcome(job.id, "run-1") is RunOutcome.FINISHED
    assert store.run_outcome(job.id, "run-2") is None


def test_a_running_job_whose_driver_finished_then_died_on_its_way_out_is_succeeded(store):
    job = store.add_job("a", SPEC)
    store.transition(job.id, S.QUEUED, S.ADMITTED)
    store.transition(job.id, S.ADMITTED, S.RUNNING, backend_handle="run-1")
    now = time.time()
    store.record_report(job.id, "run-1", report(step=TOTAL, outcome=RunOutcome.FINISHED, attempts=[
        {"number": 1, "start": now - 5, "end": now, "kind": "finished", "start_step": 0, "last_step": TOTAL}]))
    SchedulerLoop(store, Backend())._follow(store.get_job(job.id), BackendStatus(State.FAILED, "ExitCode1", "killed"))
    assert store.get_job(job.id).state is S.SUCCEEDED


def test_a_failed_runs_kind_comes_from_the_typed_outcome(store):
    job = store.add_job("a", SPEC)
    store.transition(job.id, S.QUEUED, S.ADMITTED)
    store.transition(job.id, S.ADMITTED, S.RUNNING, backend_handle="run-1")
    store.record_report(job.id, "run-1", report(step=3, outcome=RunOutcome.USER_ERROR))
    store.add_event(job.id, "outcome", "user_error: entrypoint: train.py not found in /w")
    SchedulerLoop(store, Backend())._follow(store.get_job(job.id), BackendStatus(State.FAILED, "ExitCode2"))
    got = store.get_job(job.id)
    assert (got.state, got.cause, got.message) == (S.FAILED, "user_error", "entrypoint: train.py not found in /w")
