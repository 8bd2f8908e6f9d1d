"""The ledger on a real PostgreSQL server: the same checks as on SQLite (two witnesses, idempotence, the upgrade of a 0.1.0 ledger)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from billing.ledger import Ledger, metadata
from billing.records import BillingContext
from billing.witness import ENGINE
from tests.ledger_cases import check_upgraded, write_legacy_ledger

CTX = BillingContext("acme", "k", "m", "v1", "chat", "0.50", "1.50", "0.001", "h1")


def test_a_0_1_0_ledger_upgrades_in_place_on_postgresql(postgres):
    url = postgres.new_database("legacy")
    write_legacy_ledger(url)
    ledger = check_upgraded(url)
    with ledger.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    ledger.close()


def test_two_witnesses_merge_once_on_postgresql(postgres):
    ledger = Ledger(postgres.new_database())
    ledger.record([CTX.event("a", 1795000000.0, "aborted", 10, None, 3)])
    assert [m.completion_delta for m in ledger.record([CTX.event("a", 1795000000.0, "aborted", 10, 8), CTX.event("b", 1795000000.0, "ok", 5, 4)], ENGINE)] == [5, 4]
    assert ledger.record([CTX.event("a", 1795000000.0, "aborted", 10, 8)], ENGINE) == []
    assert {w.event.request_id: (w.event.completion_tokens, w.engine_tokens, w.event.delivered_tokens) for w in ledger.witnessed(["a", "b"])} == {"a": (8, 8, 3), "b": (4, 4, None)}
    assert ledger.pending() == []
    ledger.close()
