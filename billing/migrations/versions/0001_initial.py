"""The ledger of ray-maas 0.1.0, as `metadata.create_all` made it before migrations existed.

A ledger that has these tables and no `alembic_version` is stamped at this revision when it opens.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("period", sa.String(7), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("prompt_price", sa.String(32), nullable=False),
        sa.Column("completion_price", sa.String(32), nullable=False),
        sa.Column("reserved", sa.String(40), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
    )
    op.create_index("ix_usage_tenant_period", "usage", ["tenant", "period"])
    op.create_index("ix_usage_period", "usage", ["period"])
    op.create_table(
        "engine_counts",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
    )
    op.create_table(
        "tenants",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("plan", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("seq", sa.Integer, nullable=False),
    )
    op.create_index("ix_api_keys_seq", "api_keys", ["seq"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("detail", sa.String(2048), nullable=False),
    )
    op.create_table(
        "rejected_events",
        sa.Column("request_id", sa.String(256), primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("reason", sa.String(2048), nullable=False),
        sa.Column("event", sa.Text, nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("settings", "rejected_events", "audit", "api_keys", "tenants", "engine_counts", "usage"):
        op.drop_table(table)
