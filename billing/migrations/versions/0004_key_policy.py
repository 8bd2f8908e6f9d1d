"""A key's own policy: the models it may call, its own monthly budget and RPM/TPM, and free-form metadata.

Keys written before have none of these (all models, only the tenant's limits).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("models", sa.Text, nullable=False, server_default=""))
    op.add_column("api_keys", sa.Column("monthly_budget", sa.String(40), nullable=True))
    op.add_column("api_keys", sa.Column("rpm", sa.Integer, nullable=True))
    op.add_column("api_keys", sa.Column("tpm", sa.Integer, nullable=True))
    op.add_column("api_keys", sa.Column("metadata", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    for column in ("metadata", "tpm", "rpm", "monthly_budget", "models"):
        op.drop_column("api_keys", column)
