"""STARTING jobs: RUNNING in the store, but no attempt reported yet, so their workers may not be
placed. Their demand is held (nothing is admitted into it), and a head that would fit if they
were placed already waits instead of preempting (the shortage may be a double count)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from shipyard.scheduler import JobRequest, Resources, RunningJob, Snapshot, decide

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def job(id, cpus, prio=0, t=0):
    return JobRequest(id, "a", prio, T0 + timedelta(seconds=t), 2, Resources(cpus, 0, 0))


def cluster(free_cpus, running, queued):
    return Snapshot.aggregate(Resources(free_cpus, 0, 0), Resources(4, 0, 0), running=running, queued=queued)


def test_a_starting_jobs_demand_is_held_so_a_job_behind_it_waits():
    # The high job's driver runs, its 2 workers are not placed yet: 4 CPUs look free.
    running = (RunningJob(job("high", 1, prio=10), "STARTING", T0),)
    d = decide(cluster(4, running, (job("low", 2, t=5),)))
    assert d.admitted == [] and d.preempt == []
    assert d.reasons["low"].startswith("needs 4 CPUs, 2 free")


def test_a_head_that_would_fit_if_starting_jobs_were_placed_waits_instead_of_preempting():
    # low started and its workers are placed (the backend shows 2 CPUs free), but it has not
    # reported yet: free 2 - its demand 2 = 0 for the scheduler. A high job needing 2 waits.
    running = (RunningJob(job("low", 1), "STARTING", T0),)
    d = decide(cluster(2, running, (job("high", 1, prio=10, t=5),)))
    assert d.preempt == [] and d.admitted == []
    assert d.reasons["high"].endswith("; jobs low are starting")


def test_a_real_shortage_still_preempts_a_starting_job():
    running = (RunningJob(job("low", 1), "STARTING", T0), RunningJob(job("other", 1), "RUNNING", T0))
    d = decide(cluster(0, running, (job("high", 2, prio=10, t=5),)))
    assert sorted(d.preempt) == ["low", "other"]
