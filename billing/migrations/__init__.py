"""The ledger's schema history as Alembic migrations; `billing.ledger.migrate` applies them when a ledger opens.

A new revision: `alembic -c billing/migrations/alembic.ini revision -m "..."` (then write its
upgrade by hand, and change `billing.ledger`'s tables to match: a unit test compares the two).
"""
