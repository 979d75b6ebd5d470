"""Tokens may expire: ``tokens.expires_at`` (UTC; NULL never expires).

Tokens created before this revision keep working: they get NULL. An expired token is refused
exactly like a revoked one; its row stays, so ``shipyard admin list-tokens`` still shows who held it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from shipyard.store.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as b:
        b.add_column(sa.Column("expires_at", UTCDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as b:
        b.drop_column("expires_at")
