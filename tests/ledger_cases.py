"""A ledger as ray-maas 0.1.0 wrote it (before migrations), and the checks that an upgrade keeps it: shared by the SQLite and PostgreSQL tests."""

from __future__ import annotations

from decimal import Decimal

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from billing.ledger import MIGRATIONS, Ledger
from billing.pricing import cost

NOV = 1795000000.0

# (request_id, status, prompt, completion): as 0.1.0's `record()` and `record_engine_counts()` left them.
LEGACY_ROWS = [
    ("ok-1", "ok", 100, 20),
    ("ok-2", "ok", 50, 0),
    ("bad-1", "invalid_request_error", 0, 0),  # a client error before any token
    ("cut-1", "aborted", 30, 7),  # aborted, then the engine's count filled it in
    ("lost-1", "aborted_unmetered", 40, 0),  # closed without a count
    ("wait-1", "aborted", 60, None),  # still waiting for the engine's count
]


def write_legacy_ledger(url: str) -> None:
    """Tables exactly as 0.1.0 created them (revision 0001, then no `alembic_version`), rows as it wrote them."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        for rid, status, prompt, completion in LEGACY_ROWS:
            conn.execute(
                text(
                    "INSERT INTO usage (request_id, ts, period, day, tenant, key_id, model, version, kind, status, prompt_tokens, completion_tokens, "
                    "prompt_price, completion_price, reserved, holder) VALUES (:rid, :ts, '2026-11', '2026-11-19', 'acme', 'sk-maas-x', 'm', 'v1', "
                    "'chat', :status, :prompt, :completion, '0.50', '1.50', '0.001', 'h1')"
                ),
                {"rid": rid, "ts": NOV, "status": status, "prompt": prompt, "completion": completion},
            )
        conn.execute(text("INSERT INTO engine_counts (request_id, completion_tokens, ts) VALUES ('cut-1', 7, :ts)"), {"ts": NOV})
    engine.dispose()


def legacy_total() -> Decimal:
    return sum((cost(Decimal("0.50"), Decimal("1.50"), p, c or 0) for _, _, p, c in LEGACY_ROWS), Decimal(0))


def check_upgraded(url: str) -> Ledger:
    """Open (and so upgrade) the legacy ledger; every total is kept, the waiting row still waits."""
    ledger = Ledger(url)
    assert ledger.revision == "0007"
    (row,) = ledger.spend("2026-11")
    assert row.service_tier == "default"  # 0007: every request ran at the default tier before
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (6, 280, 27) and row.amount == legacy_total()
    assert [p.request_id for p in ledger.pending()] == ["wait-1"]
    (pending,) = ledger.pending()
    assert pending.held == Decimal("0.001") - cost(Decimal("0.50"), 0, 60, 0)
    by_id = {w.event.request_id: w for w in ledger.witnessed([r[0] for r in LEGACY_ROWS])}
    assert by_id["cut-1"].engine_tokens == 7 and by_id["ok-1"].known and by_id["ok-1"].event.delivered_tokens == 20
    assert {w.event.end_user for w in by_id.values()} == {""}  # 0003: no user was kept before
    (by_user,) = ledger.spend("2026-11", by_user=True)
    assert by_user.end_user == "" and by_user.amount == legacy_total()
    return ledger
