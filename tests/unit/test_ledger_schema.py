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
    assert again.revision == "0002" and again.spend("2026-11")[0].requests == 6
    again.close()


def test_the_tables_the_code_uses_are_what_the_migrations_make(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/new.db")
    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    ledger.close()
    assert diff == []
