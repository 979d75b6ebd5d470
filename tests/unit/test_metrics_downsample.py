"""The store holds a job's metrics to a bounded number of rows (store/metrics.py): the newest
stay as reported, older ones are averaged into evenly spaced buckets. Checked on the pure rule
and on a SQLite store fed like a driver feeds it over a million-step run."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shipyard.run.records import DriverReport
from shipyard.store import Store
from shipyard.store.metrics import MAX_POINTS, OLD_BUCKETS, RECENT_POINTS, downsample

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SPEC = {"name": "long", "entrypoint": "train.py:train", "dataset": {"uri": "/data"}}


def rows(steps, f=lambda s: float(s)):
    return [(s, T0 + timedelta(seconds=s), {"loss": f(s)}) for s in steps]


def test_rows_within_the_limit_are_kept_as_they_are():
    assert downsample(rows(range(MAX_POINTS))) is None


def test_old_rows_become_even_buckets_of_means_and_recent_rows_stay_raw():
    given = rows(range(5000))
    kept = downsample(given)
    assert len(kept) <= OLD_BUCKETS + RECENT_POINTS
    assert kept[-RECENT_POINTS:] == given[-RECENT_POINTS:]  # the live end keeps full resolution
    old = kept[:-RECENT_POINTS]
    widths = {b[0] - a[0] for a, b in zip(old, old[1:])}
    assert len(widths) == 1, widths  # evenly spaced ...
    w = widths.pop()
    assert w & (w - 1) == 0  # ... by a power of two
    assert old[0][0] == 0
    for step, at, values in old:  # each bucket: the mean of its steps, at its first step, its last time
        members = [s for s in range(step, min(step + w, 5000 - RECENT_POINTS))]
        assert values["loss"] == pytest.approx(sum(members) / len(members))
        assert at == T0 + timedelta(seconds=members[-1])


def test_a_sparse_metric_and_a_diverged_one_survive_in_their_buckets():
    given = [(s, T0, {"loss": None if s >= 3000 else 1.0, **({"eval": 0.5} if s % 1000 == 0 else {})})
             for s in range(5000)]
    old = downsample(given)[:-RECENT_POINTS]
    assert [v["eval"] for _, _, v in old if "eval" in v and v["eval"] is not None] == [0.5] * 5  # steps 0..4000
    assert all(v["loss"] is None for s, _, v in old if s >= 3000)  # NaN reports stay a gap
    assert all(v["loss"] == 1.0 for s, _, v in old if s < 2900)


def test_thinning_again_merges_whole_buckets():
    once = downsample(rows(range(3000)))
    twice = downsample(once + rows(range(3000, 9000)))
    again = downsample(rows(range(9000)))
    # Nested power-of-two buckets: thinning in two goes puts the same steps at the bucket starts.
    assert [s for s, _, _ in twice] == [s for s, _, _ in again]


def test_a_million_step_run_stays_bounded_in_the_store(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'shipyard.db'}")
    store.create_tenant("a")
    job_id = store.add_job("a", SPEC).id
    # A driver posts every 10 s the points it saw once a second; here 100 reports of 25 points,
    # one every 400 steps: 1,000,000 steps (a real run has more points; the rule is the same).
    step, stride = 0, 400
    for _ in range(100):
        points = []
        for _ in range(25):
            step += stride
            points.append({"step": step, "at": 1.7e9 + step, "values": {"loss": 1.0 / step, "step_time_s": 0.1}})
        store.record_report(job_id, "run-1", DriverReport(schema=2, step=step, total=1_000_000, metrics=points))
        if step % 100_000 == 0:
            assert len(store.metrics(job_id)) <= MAX_POINTS
    series = store.metrics(job_id)
    assert len(series) <= MAX_POINTS
    # The whole run is still there, evenly: no gap wider than one bucket (a power of two that
    # fits a million steps into OLD_BUCKETS buckets: 4096 steps).
    assert max(b.step - a.step for a, b in zip(series, series[1:])) <= 4096
    assert series[0].step == stride and series[-1].step == 1_000_000
    assert [p.step for p in series[-RECENT_POINTS:]] == list(range(1_000_000 - stride * (RECENT_POINTS - 1),
                                                                   1_000_001, stride))
    assert all(p.values["step_time_s"] == pytest.approx(0.1) for p in series)
    assert store.latest_metrics(job_id)["loss"] == pytest.approx(1e-6)
    store.close()
