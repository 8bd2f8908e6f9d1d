"""The request's `user` on its ledger row, so a tenant can break its usage down by its own end users.

Rows written before carry the empty string (no user was kept).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("end_user", sa.String(256), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("usage", "end_user")
