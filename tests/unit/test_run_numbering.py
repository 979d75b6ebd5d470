"""Runs are numbered by the store, not by what the backend still remembers: after a Ray head
restart forgot every submission, a requeued job's next run is a new run with its own attempts,
not a reuse of ``-1`` that merges them into the first run's."""

from __future__ import annotations

import time

from shipyard.run.records import DriverReport
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.store import JobState, Store

S = JobState
SPEC = {"name": "p", "entrypoint": "m:f", "dataset": {"uri": "/d"}, "workers": {"count": 1, "cpus": 1}}


class ForgetfulHead:
    """Numbers submissions like the Ray backend does: from the submissions it still knows."""

    name = "fake"

    def __init__(self):
        self.known: list[str] = []

    def submit(self, job_id, spec, tenant, run=1, env=None):
        handle = f"shipyard-{job_id}-{max(len(self.known) + 1, run)}"
        self.known.append(handle)
        return handle


def test_a_requeued_job_gets_a_new_run_number_after_the_head_forgot_the_old_one(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.create_tenant("a")
        job = store.add_job("a", SPEC)
        head = ForgetfulHead()
        loop = SchedulerLoop(store, head)
        store.transition(job.id, S.QUEUED, S.ADMITTED)
        loop._submit(store.get_job(job.id))
        first = store.get_job(job.id)
        assert (first.backend_handle, first.runs) == (f"shipyard-{job.id}-1", 1)
        t0 = time.time()
        store.record_report(job.id, first.backend_handle, DriverReport(schema=2, step=7, attempts=[
            {"number": 1, "start": t0, "start_step": 0, "last_step": 7}]))

        head.known.clear()  # the head restarted: its job records are gone
        store.transition(job.id, S.ADMITTED, S.PREEMPTED, cause="lost")
        store.transition(job.id, S.PREEMPTED, S.QUEUED)
        store.transition(job.id, S.QUEUED, S.ADMITTED)
        loop._submit(store.get_job(job.id))
        second = store.get_job(job.id)
        assert (second.backend_handle, second.runs) == (f"shipyard-{job.id}-2", 2)
        store.record_report(job.id, second.backend_handle, DriverReport(schema=2, step=3, attempts=[
            {"number": 1, "start": t0 + 10, "start_step": 0, "last_step": 3}]))
        runs = [(a.submission, a.last_step) for a in store.attempts(job.id)]
        assert runs == [(f"shipyard-{job.id}-1", 7), (f"shipyard-{job.id}-2", 3)]


def test_a_job_whose_runs_keep_vanishing_is_requeued_max_requeues_times_then_fails(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.create_tenant("a")
        job = store.add_job("a", SPEC)
        loop = SchedulerLoop(store, ForgetfulHead(), max_requeues=3)
        for n in range(1, 5):
            store.transition(job.id, S.QUEUED, S.ADMITTED, backend_handle=f"shipyard-{job.id}-{n}")
            loop._lost(store.get_job(job.id), "its run vanished with the Ray head")
            got = store.get_job(job.id)
            if n <= 3:
                assert (got.state, got.requeues) == (S.QUEUED, n)
        assert got.state is S.FAILED and got.cause == "lost" and "requeued 3 times already" in got.message
