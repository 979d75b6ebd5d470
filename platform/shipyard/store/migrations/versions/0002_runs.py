"""Attempts reported by a job's driver, and the job's latest checkpoint.

Each submission of a job to a backend (a *run*: the first one, and one per requeue after a
preemption or a vanished run) has a driver whose ledger numbers its attempts from 1. The store
numbers attempts per job across runs, so an attempt also records which run (``submission``, the
backend handle) and which of that run's attempts (``run_number``) it is: a report is an upsert
on that pair. ``kind`` is how it ended (finished | failed | preempted | user_error).

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as b:
        b.add_column(sa.Column("submission", sa.String(200), nullable=True))
        b.add_column(sa.Column("run_number", sa.Integer, nullable=True))
        b.add_column(sa.Column("kind", sa.String(16), nullable=True))
        b.add_column(sa.Column("start_step", sa.BigInteger, nullable=True))
        b.add_column(sa.Column("committed_step", sa.BigInteger, nullable=True))
        b.add_column(sa.Column("recovery_s", sa.Float, nullable=True))
        b.create_unique_constraint("uq_attempts_run", ["job_id", "submission", "run_number"])
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("checkpoint", sa.Text, nullable=True))
        b.add_column(sa.Column("total_steps", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_column("total_steps")
        b.drop_column("checkpoint")
    with op.batch_alter_table("attempts") as b:
        b.drop_constraint("uq_attempts_run", type_="unique")
        for c in ("recovery_s", "committed_step", "start_step", "kind", "run_number", "submission"):
            b.drop_column(c)
