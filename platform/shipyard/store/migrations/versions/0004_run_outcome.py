"""The driver's explicit outcome of a job's current run.

``jobs.outcome`` is how the driver of run ``jobs.outcome_run`` (a backend handle) said that run
ended: finished (trained to the end) | preempted (stopped after committing a checkpoint) |
stopped | failed | user_error (:class:`shipyard.runtime.report.RunOutcome`). The scheduler loop
decides from it whether a preempted run finished anyway (SUCCEEDED) or is requeued, and a cancel
that arrives after the run finished leaves the job SUCCEEDED. Keyed by the run, so a requeued
job's new run never reads its previous run's word.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("outcome", sa.String(16), nullable=True))
        b.add_column(sa.Column("outcome_run", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_column("outcome_run")
        b.drop_column("outcome")
