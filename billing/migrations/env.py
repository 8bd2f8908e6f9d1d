"""Alembic's entry: runs the revisions on the connection `billing.ledger.migrate` hands over (or on the ini's URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

config = context.config
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
else:  # the `alembic` command line, for developers
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        context.configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
