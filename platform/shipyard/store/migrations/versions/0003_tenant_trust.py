"""Sharing one server: tenants' storage roots and priority, and submit idempotency keys.

``tenants.storage_roots`` is a JSON list of ``{"uri", "writable"}``: the prefixes a tenant's jobs
may read (and, when writable, write) besides the server's default root for it. ``tenants.priority``
is set by an admin: a job may preempt another tenant's job only when its tenant's priority is
higher. ``jobs.idempotency_key`` is the client's ``Idempotency-Key`` header, unique per tenant, so
a retried submit returns the job the first one created.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as b:
        b.add_column(sa.Column("storage_roots", sa.JSON, nullable=True))
        b.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("idempotency_key", sa.String(128), nullable=True))
        b.create_unique_constraint("uq_jobs_idempotency", ["tenant", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint("uq_jobs_idempotency", type_="unique")
        b.drop_column("idempotency_key")
    with op.batch_alter_table("tenants") as b:
        b.drop_column("priority")
        b.drop_column("storage_roots")
