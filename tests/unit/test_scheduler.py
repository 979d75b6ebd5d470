"""Scheduler policy table: order, quotas, gang fit, backfill without starvation, preemption, reasons.

Everything is a pure function over a snapshot; the tests build snapshots by hand.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shipyard.scheduler import JobRequest, Node, Policy, Quota, Resources, RunningJob, Snapshot, decide
from shipyard.scheduler.admission import place
from shipyard.scheduler.queue import order
from shipyard.spec import spec_from_dict

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
GiB = 2**30


def job(id, gpus=1.0, workers=1, prio=0, t=0, tenant="a", cpus=1.0, mem=0.0):
    return JobRequest(id, tenant, prio, T0 + timedelta(seconds=t), workers, Resources(cpus, gpus, mem))


def run(j, state="RUNNING", started=0, placement=None):
    return RunningJob(j, state, T0 + timedelta(seconds=started) if state != "ADMITTED" else None, placement)


def cluster(free_gpus, total_gpus=8, cpus=64, **kw):
    return Snapshot.aggregate(Resources(cpus, free_gpus, 0), Resources(cpus, total_gpus, 0), **kw)


# -- order ----------------------------------------------------------------------------------

def test_higher_priority_first_then_older_first():
    q = (job("old-low", t=0, prio=0), job("new-high", t=5, prio=9), job("old-high", t=1, prio=9))
    assert [j.id for j in order(q)] == ["old-high", "new-high", "old-low"]
    d = decide(cluster(1, queued=q))
    assert d.admitted == ["old-high"]


def test_same_instant_submissions_keep_store_order():
    a = JobRequest("z", "a", 0, T0, 1, Resources(1, 1), seq=1)
    b = JobRequest("a", "a", 0, T0, 1, Resources(1, 1), seq=2)
    assert decide(cluster(1, queued=(b, a))).admitted == ["z"]


def test_requeued_preempted_job_keeps_its_place_by_original_submit_time():
    requeued = job("preempted-earlier", t=0)
    assert decide(cluster(1, queued=(job("newer", t=50), requeued))).admitted == ["preempted-earlier"]


# -- quotas ---------------------------------------------------------------------------------

def test_gpu_quota_blocks_one_tenant_while_another_proceeds():
    running = (run(job("r1", gpus=8, tenant="a")),)
    snap = cluster(8, total_gpus=16, queued=(job("a2", tenant="a", t=1), job("b1", tenant="b", t=2)),
                   running=running, quotas={"a": Quota(max_gpus=8)})
    d = decide(snap)
    assert d.admitted == ["b1"]
    assert d.reasons["a2"] == "quota: tenant a uses 8/8 GPUs, job needs 1"


def test_quota_counts_jobs_admitted_in_the_same_pass():
    q = (job("x", gpus=4, t=0), job("y", gpus=4, t=1))
    d = decide(cluster(8, queued=q, quotas={"a": Quota(max_gpus=6)}))
    assert d.admitted == ["x"] and d.reasons["y"].startswith("quota: tenant a uses 4/6 GPUs")


def test_cpu_and_running_job_quotas():
    snap = cluster(8, queued=(job("c", gpus=0, cpus=4, workers=2),), quotas={"a": Quota(max_cpus=6)})
    assert decide(snap).reasons["c"] == "quota: job needs 8 CPUs, more than tenant a's limit of 6"
    running = tuple(run(job(f"r{i}", gpus=0)) for i in range(3))
    snap = cluster(8, queued=(job("n", gpus=0),), running=running, quotas={"a": Quota(max_running_jobs=3)})
    assert decide(snap).reasons["n"] == "quota: tenant a runs 3/3 jobs"


def test_quota_blocked_job_neither_reserves_nor_preempts():
    running = (run(job("mine", gpus=4, tenant="a")), run(job("low", gpus=4, tenant="b", prio=0)))
    q = (job("urgent", gpus=4, prio=10, tenant="a", t=0), job("cpu-job", gpus=0, tenant="b", t=1))
    d = decide(cluster(0, queued=q, running=running, quotas={"a": Quota(max_gpus=4)}))
    assert d.preempt == [] and d.head is None
    assert d.admitted == ["cpu-job"]
    assert d.reasons["urgent"].startswith("quota: tenant a uses 4/4 GPUs")


# -- gang admission -------------------------------------------------------------------------

def test_gang_is_all_or_nothing():
    d = decide(cluster(3, queued=(job("g", workers=4),)))
    assert d.admit == []
    assert d.reasons["g"] == "needs 4 GPUs, 3 free"


def test_gang_spans_nodes_when_no_node_holds_it():
    nodes = (Node("n1", Resources(8, 2)), Node("n2", Resources(8, 2)))
    d = decide(Snapshot(queued=(job("g", workers=4),), nodes=nodes))
    assert d.admit[0].placement == {"n1": 2, "n2": 2}


def test_per_node_fragmentation_is_not_a_fit_even_if_the_sum_is():
    nodes = (Node("n1", Resources(8, 2), Resources(8, 4)), Node("n2", Resources(8, 2), Resources(8, 4)))
    d = decide(Snapshot(queued=(job("wide", gpus=3),), nodes=nodes))
    assert d.admit == []
    assert "split across nodes so that only 0 fit" in d.reasons["wide"]


def test_small_job_goes_to_the_tightest_node_keeping_big_holes():
    assert place(job("s"), {"big": Resources(8, 4), "tight": Resources(8, 1)}) == {"tight": 1}


def test_memory_is_a_dimension_of_fit():
    snap = Snapshot.aggregate(Resources(16, 0, 8 * GiB), Resources(16, 0, 64 * GiB),
                              queued=(job("m", gpus=0, workers=2, mem=6 * GiB),))
    assert decide(snap).reasons["m"] == "needs 12 GiB memory, 8 free"


def test_admitted_jobs_not_yet_placed_are_subtracted_from_free():
    # The backend still reports 4 GPUs free: it has not seen the ADMITTED job's workers yet.
    d = decide(cluster(4, queued=(job("next", t=1),), running=(run(job("just", gpus=4), "ADMITTED"),)))
    assert d.admitted == [] and d.reasons["next"] == "needs 1 GPUs, 0 free"


def test_job_larger_than_the_cluster_does_not_block_the_queue():
    q = (job("huge", gpus=16, prio=5), job("ok", gpus=2))
    d = decide(cluster(8, total_gpus=8, queued=q))
    assert d.admitted == ["ok"] and d.head is None
    assert d.reasons["huge"] == "unschedulable: needs 16 GPUs, 8 in the whole cluster"
    nodes = (Node("n1", Resources(8, 4), Resources(8, 4)), Node("n2", Resources(8, 4), Resources(8, 4)))
    reason = decide(Snapshot(queued=(job("w", gpus=6),), nodes=nodes)).reasons["w"]
    assert reason == "unschedulable: one worker needs 6 GPUs + 1 CPU, more than any node has"


# -- backfill -------------------------------------------------------------------------------

def test_backfill_uses_only_what_the_head_cannot():
    q = (job("head", workers=4, t=0), job("gpu-small", t=1), job("cpu-only", gpus=0, workers=2, t=2))
    d = decide(cluster(2, queued=q))
    assert d.head == "head" and d.admitted == ["cpu-only"]
    assert d.admit[0].backfilled_past == "head"
    assert d.reasons["gpu-small"].startswith("fits only in capacity held for head")


def test_backfill_lands_off_the_heads_planned_nodes():
    nodes = (Node("n1", Resources(8, 2), Resources(8, 4)), Node("n2", Resources(8, 2), Resources(8, 2)))
    q = (job("head", gpus=4, t=0), job("small", gpus=1, t=1))  # head can only ever run on n1
    d = decide(Snapshot(queued=q, nodes=nodes))
    assert d.admit[0].job_id == "small" and d.admit[0].placement == {"n2": 1}


def test_strict_policy_starts_nothing_behind_a_waiting_head():
    q = (job("head", workers=4, t=0), job("cpu-only", gpus=0, t=1))
    d = decide(cluster(2, queued=q), Policy(backfill=False))
    assert d.admit == [] and d.reasons["cpu-only"].startswith("behind head")


def simulate(ticks, arrivals, total_gpus=4, running=(), ends=None, duration=2):
    """A tiny cluster: returns {job id: tick it started}. ``ends``: when the initially running
    jobs end; every admitted job runs ``duration`` ticks."""
    live = {r.id: (r, (ends or {}).get(r.id, 1)) for r in running}
    queued, started = [], {}
    for tick in range(ticks):
        live = {k: (r, end) for k, (r, end) in live.items() if end > tick}
        queued += arrivals.get(tick, [])
        used = sum(r.job.demand.gpus for r, _ in live.values())
        d = decide(cluster(total_gpus - used, total_gpus, queued=tuple(queued),
                           running=tuple(r for r, _ in live.values())))
        for a in d.admit:
            j = next(q for q in queued if q.id == a.job_id)
            queued.remove(j)
            started[j.id] = tick
            live[j.id] = (run(j, started=tick), tick + duration)
    return started


def test_a_stream_of_small_jobs_does_not_starve_the_head():
    # 2 of 4 GPUs busy until tick 5; the head needs 4; a 1-GPU job arrives every tick.
    long = run(job("long", gpus=2, t=-10))
    arrivals = {0: [job("head", gpus=4, t=0)]}
    for i in range(1, 30):
        arrivals[i] = [job(f"small{i}", gpus=1, t=i)]
    started = simulate(30, arrivals, running=(long,), ends={"long": 5})
    assert started["head"] == 5  # as soon as the long job ends: backfill never delayed it
    assert len(started) > 20  # the small jobs ran too: the 2 GPUs the head could not use meanwhile, then after it


# -- preemption -----------------------------------------------------------------------------

def test_high_priority_preempts_lowest_priority_first():
    running = (run(job("p1", gpus=2, prio=1)), run(job("p3", gpus=2, prio=3)), run(job("p2", gpus=4, prio=2)))
    d = decide(cluster(0, queued=(job("urgent", gpus=2, prio=9),), running=running))
    assert d.preempt == ["p1"] and d.admit == []
    assert d.reasons["p1"] == "preempted for urgent (priority 9 > 1)"
    assert d.reasons["urgent"] == "needs 2 GPUs, 0 free; preempting p1"


def test_victim_set_is_minimal():
    # Greedy takes p1 (1 GPU), not enough, then p2 (4 GPUs); p1 alone was not needed: spared.
    running = (run(job("p1", gpus=1, prio=1)), run(job("p2", gpus=4, prio=2)), run(job("p5", gpus=3, prio=5)))
    d = decide(cluster(0, queued=(job("urgent", gpus=4, prio=9),), running=running))
    assert d.preempt == ["p2"]


def test_only_strictly_lower_priority_running_or_admitted_jobs_are_victims():
    running = (run(job("same", gpus=2, prio=5)), run(job("restarting", gpus=2, prio=0), "RESTARTING"))
    d = decide(cluster(0, total_gpus=4, queued=(job("h", gpus=2, prio=5),), running=running))
    assert d.preempt == [] and d.reasons["h"] == "needs 2 GPUs, 0 free"
    assert decide(cluster(0, total_gpus=4, queued=(job("h", gpus=2, prio=5),), running=running),
                  Policy(preemption=False)).preempt == []


def test_among_equals_the_job_losing_least_work_goes_first():
    running = (run(job("old", gpus=1), started=0), run(job("young", gpus=1), started=100),
               run(job("not-started", gpus=1), "ADMITTED"))
    d = decide(cluster(0, total_gpus=3, queued=(job("h", prio=1, gpus=1),), running=running))
    assert d.preempt == ["not-started"]
    d = decide(cluster(0, total_gpus=3, queued=(job("h", prio=1, gpus=1),), running=running[:2]))
    assert d.preempt == ["young"]


def test_draining_victims_are_not_preempted_twice_and_their_capacity_is_held():
    # Tick 2 of a preemption: p1 is PREEMPTED and still stopping; a small job arrived.
    running = (run(job("p1", gpus=4, prio=0), "PREEMPTED"), run(job("p2", gpus=4, prio=0)))
    q = (job("urgent", gpus=4, prio=9, t=0), job("small", gpus=1, t=1))
    d = decide(cluster(0, total_gpus=8, queued=q, running=running))
    assert d.preempt == [] and d.admit == []
    assert d.reasons["urgent"].endswith("preempted jobs p1 are stopping")
    # p1 has stopped and was requeued: the urgent job takes its GPUs, p1 waits again.
    q2 = (job("p1", gpus=4, prio=0, t=-100),) + q
    d = decide(cluster(4, total_gpus=8, queued=q2, running=running[1:]))
    assert d.admitted == ["urgent"] and "p1" in d.reasons


def test_preemption_per_node_frees_a_node_the_head_fits_on():
    nodes = (Node("n1", Resources(8, 0), Resources(8, 4)), Node("n2", Resources(8, 0), Resources(8, 4)))
    running = (run(job("a", gpus=2, prio=1), placement={"n1": 1}), run(job("b", gpus=2, prio=1), placement={"n2": 1}),
               run(job("c", gpus=2, prio=2), placement={"n1": 1}))
    d = decide(Snapshot(queued=(job("h", gpus=4, prio=9),), running=running, nodes=nodes))
    assert sorted(d.preempt) == ["a", "c"]  # n1 emptied; b alone (lowest) would not help


def test_no_victims_when_even_all_would_not_be_enough():
    running = (run(job("low", gpus=2, prio=0)), run(job("high", gpus=6, prio=10)))
    d = decide(cluster(0, queued=(job("h", gpus=4, prio=5),), running=running))
    assert d.preempt == []


# -- snapshot helpers -----------------------------------------------------------------------

@pytest.mark.parametrize("as_dict", [False, True])
def test_job_request_from_a_job_spec(as_dict):
    spec = spec_from_dict({"name": "x", "entrypoint": "m:f", "dataset": {"uri": "/d"},
                           "workers": {"count": 4, "cpus": 2, "gpus": 1}})
    r = JobRequest.from_spec("j", "a", 3, T0, spec.model_dump(mode="json") if as_dict else spec)
    assert (r.workers, r.per_worker, r.demand.gpus) == (4, Resources(2, 1, 0), 4)
