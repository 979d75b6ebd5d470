"""The scheduler loop's end of a preemption, over a SQLite store and a fake backend: a stopped
run is requeued, but a run that finished before the stop reached it is SUCCEEDED, not rerun."""

from __future__ import annotations

import time

import pytest

from shipyard.backends.base import BackendStatus, State
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.store import JobState, Store

S = JobState
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


def preempted_job(store: Store, last_kind: str):
    job = store.add_job("a", SPEC)
    store.transition(job.id, S.QUEUED, S.ADMITTED)
    store.transition(job.id, S.ADMITTED, S.RUNNING, backend_handle="run-1")
    now = time.time()
    store.record_report(job.id, "run-1", step=40, total=40, attempts=[
        {"number": 1, "start": now - 5, "end": now, "kind": last_kind, "start_step": 0, "last_step": 40,
         "committed_step": 40, "steps_lost": 0}])
    return store.transition(job.id, S.RUNNING, S.PREEMPTED, cause="preempted")


def test_a_preempted_run_that_stopped_after_its_checkpoint_is_requeued(store):
    job = preempted_job(store, "preempted")
    SchedulerLoop(store, Backend())._follow(job, BackendStatus(State.STOPPED, "Stopped"))
    got = store.get_job(job.id)
    assert (got.state, got.backend_handle, got.cause) == (S.QUEUED, None, "preempted")


@pytest.mark.parametrize("ray_state", [State.STOPPED, State.SUCCEEDED])
def test_a_preempted_run_that_finished_anyway_is_succeeded_not_requeued(store, ray_state):
    # Ray reports STOPPED for a run it was asked to stop even when the driver exited 0; the
    # driver's last attempt ("finished") says what happened.
    job = preempted_job(store, "finished")
    SchedulerLoop(store, Backend())._follow(job, BackendStatus(ray_state))
    got = store.get_job(job.id)
    assert got.state is S.SUCCEEDED and got.ended_at is not None
    last = store.events(job.id, kind="state")[-1].message
    assert last.startswith("PREEMPTED -> SUCCEEDED (finished)")
