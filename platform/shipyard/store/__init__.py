"""The persistent store of the job service: jobs, attempts, events, metrics, tenants, tokens.

``Store.open(url)`` connects (SQLite file by default, PostgreSQL by URL) and applies the Alembic
migrations in ``migrations/``; the job state machine is in :mod:`shipyard.store.states`.
"""

from shipyard.store.errors import (Conflict, IllegalTransition, JobNotFound, NotFound, StaleTransition,
                                   StoreError, TenantExists, TenantInUse, TenantNotFound)
from shipyard.store.records import Attempt, Event, Job, MetricPoint, Page, Tenant, Token
from shipyard.store.states import JobState
from shipyard.store.store import Store

__all__ = ["Store", "JobState", "Job", "Attempt", "Event", "MetricPoint", "Page", "Tenant", "Token",
           "StoreError", "NotFound", "JobNotFound", "TenantNotFound", "Conflict", "TenantExists",
           "TenantInUse", "IllegalTransition", "StaleTransition"]
