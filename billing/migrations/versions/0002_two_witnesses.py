"""Two witnesses per request: the ingress's delivered count and the engine's count beside the billed one.

`usage.completion_tokens` stays the billed count.  Every row so far came from the ingress, so its
`delivered_tokens` is that count, and `known` says the ingress knew it; a row still waiting for the
engine (NULL) is billed its floor, 0, and stays pending.  An aborted row the engine's count already completed keeps it as `engine_tokens`.
Totals are unchanged (sums already read NULL as 0).  On PostgreSQL, `usage.status` is widened to 64
characters where an early ledger made it 16.  `engine_counts` is no longer written (the engine's report
now carries the whole request) and is kept for what it holds.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("delivered_tokens", sa.Integer, nullable=True))
    op.add_column("usage", sa.Column("engine_tokens", sa.Integer, nullable=True))
    op.add_column("usage", sa.Column("known", sa.Boolean, nullable=False, server_default=sa.false()))
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("usage", "status", type_=sa.String(64))
    op.execute(
        "UPDATE usage SET engine_tokens = completion_tokens WHERE status <> 'ok' AND completion_tokens IS NOT NULL AND status NOT LIKE '%\\_unmetered' ESCAPE '\\'"
    )
    op.execute("UPDATE usage SET known = (status = 'ok' OR engine_tokens IS NULL) WHERE completion_tokens IS NOT NULL")
    op.execute("UPDATE usage SET completion_tokens = 0 WHERE completion_tokens IS NULL")
    op.execute("UPDATE usage SET delivered_tokens = completion_tokens WHERE engine_tokens IS NULL")
    op.execute("UPDATE usage SET delivered_tokens = 0 WHERE engine_tokens IS NOT NULL")


def downgrade() -> None:
    op.drop_column("usage", "engine_tokens")
    op.drop_column("usage", "delivered_tokens")
