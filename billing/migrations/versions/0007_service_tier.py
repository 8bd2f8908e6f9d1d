"""The service tier of each ledger row (`priority`, `default`, `flex`, `batch`): its prices are that tier's multiple of
the list price, and invoices, `/v1/usage` and the console break spend down by it.

Rows written before ran at the `default` tier, as every request did then.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: no table copy on SQLite, no rewrite on PostgreSQL.
    op.add_column("usage", sa.Column("service_tier", sa.String(16), nullable=False, server_default="default"))


def downgrade() -> None:
    op.drop_column("usage", "service_tier")
