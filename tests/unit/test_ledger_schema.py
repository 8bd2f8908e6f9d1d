"""The ledger's schema under Alembic: a ledger 0.1.0 wrote upgrades in place keeping every total; the tables match the last revision."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from billing.ledger import Ledger, metadata
from tests.ledger_cases import check_upgraded, write_legacy_ledger


def test_a_ledger_written_before_migrations_upgrades_in_place_and_keeps_every_total(tmp_path):
    url = f"sqlite:///{tmp_path}/legacy.db"
    write_legacy_ledger(url)
    check_upgraded(url).close()
    again = Ledger(url)  # opening an upgraded ledger changes nothing
    assert again.revision == "0007" and again.spend("2026-11")[0].requests == 6
    again.close()


def test_the_tables_the_code_uses_are_what_the_migrations_make(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/new.db")
    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    ledger.close()
    assert diff == []


def test_usage_breaks_down_by_the_requests_user(tmp_path):
    from billing.records import BillingContext
    from billing.reports import usage_report

    ledger = Ledger(f"sqlite:///{tmp_path}/u.db")
    ts = 1795564800.0  # 2026-11-24
    for i, user in enumerate(["alice", "alice", "bob", ""]):
        ctx = BillingContext("acme", "k1", "m", "v1", "chat", "1", "2", "0.01", "ingress-1", user)
        ledger.record([ctx.event(f"r{i}", ts, "ok", 10, 5 + i)])
    report = usage_report(ledger.spend("2026-11", "acme", by_day=True, by_user=True), "2026-11", "USD", "acme", by_user=True)
    assert {r["user"]: (r["requests"], r["completion_tokens"]) for r in report["data"]} == {"": (1, 8), "alice": (2, 11), "bob": (1, 7)}
    plain = usage_report(ledger.spend("2026-11", "acme", by_day=True), "2026-11", "USD", "acme")
    assert "user" not in plain["data"][0] and plain["total"] == report["total"]
