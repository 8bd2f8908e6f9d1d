"""Cached prompt tokens on each ledger row, priced apart: how many of a request's prompt tokens the engine's
prefix cache held (the engine's own count) and the price per million of those at the time of the request.

Rows written before carry 0 cached tokens and the empty price (the prompt price), so their amounts do not change.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Two plain ADD COLUMNs (constant defaults): no table copy on SQLite, no rewrite on PostgreSQL.
    op.add_column("usage", sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"))
    op.add_column("usage", sa.Column("cached_price", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("usage", "cached_price")
    op.drop_column("usage", "cached_tokens")
