"""How many runs (backend submissions) a job has had, and how many times it was requeued.

The next run of a requeued job is numbered from this count, not from what the backend still
remembers: a Ray head that restarted has forgotten every earlier submission, and numbering from
its list reused ``shipyard-<job>-1``, merging a new run's attempts into the old run's. The
requeue count bounds how often a lost run is retried (it was counted by matching the text of
state events).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("runs", sa.Integer, nullable=False, server_default="0"))
        b.add_column(sa.Column("requeues", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_column("requeues")
        b.drop_column("runs")
