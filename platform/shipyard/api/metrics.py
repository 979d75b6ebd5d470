"""Prometheus metrics of the server (``GET /metrics``), on a registry of the app's own.

Labels are bounded: HTTP requests by method, route *template* (``/v1/jobs/{job_id}``, never an
id) and status class; jobs by state (eight values), read from the store at scrape time.

Per-job series (``shipyard_job_*``) exist only for jobs that are RUNNING or RESTARTING, at most
:data:`MAX_JOB_SERIES` of them, each with at most :data:`MAX_METRICS_PER_JOB` training metrics:
a job's series disappear when it ends (as kube-state-metrics does for finished pods), so the
number of series is bounded by what runs now, not by the history of the store.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from shipyard.runtime.meter import BUILTIN


class _JobsCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        g = GaugeMetricFamily("shipyard_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(self.store.count_jobs().items()):
            g.add_metric([state], n)
        yield g


MAX_JOB_SERIES = 200
MAX_METRICS_PER_JOB = 20
LIVE = ("RUNNING", "RESTARTING")


def _priority(name: str) -> tuple:
    """Which metrics keep a series when a job reports more than the cap: loss, then the
    platform's built-ins (the same names for every job, so dashboards can rely on them), then
    the rest by name."""
    return (name != "loss", name not in BUILTIN, name)


class _RunningJobsCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        labels = ["job", "name", "tenant"]
        step = GaugeMetricFamily("shipyard_job_step", "Last step reported by a running job", labels=labels)
        progress = GaugeMetricFamily("shipyard_job_progress", "Fraction of total steps done (0-1)", labels=labels)
        attempts = GaugeMetricFamily("shipyard_job_attempts", "Attempts of a running job so far", labels=labels)
        lost = GaugeMetricFamily("shipyard_job_steps_lost", "Steps lost to failures and preemptions", labels=labels)
        value = GaugeMetricFamily("shipyard_job_metric", "Latest value of a metric the job reports",
                                  labels=[*labels, "metric"])
        jobs = [j for j in self.store.active_jobs() if j.state.value in LIVE][:MAX_JOB_SERIES]
        for j in jobs:
            key = [j.id, j.name, j.tenant]
            if j.last_step is not None:
                step.add_metric(key, j.last_step)
            if j.progress is not None:
                progress.add_metric(key, j.progress)
            runs = self.store.attempts(j.id)
            attempts.add_metric(key, len(runs))
            lost.add_metric(key, sum(a.steps_lost or 0 for a in runs))
            latest = self.store.latest_metrics(j.id, window=50)
            for name in sorted(latest, key=_priority)[:MAX_METRICS_PER_JOB]:
                if latest[name] is not None:
                    value.add_metric([*key, name], latest[name])
        yield from (step, progress, attempts, lost, value)


class ServerMetrics:
    def __init__(self, store):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shipyard_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("shipyard_http_request_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.submissions = Counter("shipyard_submissions", "Jobs accepted by POST /v1/jobs", registry=r)
        self.reports = Counter("shipyard_driver_reports", "Progress reports received from job drivers", registry=r)
        self.ticks = Histogram("shipyard_scheduler_tick_seconds", "Duration of one scheduler tick", registry=r,
                               buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.admissions = Counter("shipyard_admissions", "Jobs admitted by the scheduler", registry=r)
        self.preemptions = Counter("shipyard_preemptions", "Jobs preempted by the scheduler", registry=r)
        r.register(_JobsCollector(store))
        # Per-job series name jobs, tenants and losses: served only to an admin token.
        self.jobs_registry = CollectorRegistry()
        self.jobs_registry.register(_RunningJobsCollector(store))

    def on_tick(self, seconds: float, decisions) -> None:
        self.ticks.observe(seconds)
        if decisions is not None:
            self.admissions.inc(len(decisions.admit))
            self.preemptions.inc(len(decisions.preempt))
