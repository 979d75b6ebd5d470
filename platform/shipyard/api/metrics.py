"""Prometheus metrics of the server (``GET /metrics``), on a registry of the app's own.

Labels are bounded: HTTP requests by method, route *template* (``/v1/jobs/{job_id}``, never an
id) and status class; jobs by state (eight values), read from the store at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily


class _JobsCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        g = GaugeMetricFamily("shipyard_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(self.store.count_jobs().items()):
            g.add_metric([state], n)
        yield g


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

    def on_tick(self, seconds: float, decisions) -> None:
        self.ticks.observe(seconds)
        if decisions is not None:
            self.admissions.inc(len(decisions.admit))
            self.preemptions.inc(len(decisions.preempt))
