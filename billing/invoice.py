"""Monthly invoices with pandas, as pure functions over ledger rows.

One line per (model, version, service tier, unit prices): token sums (exact integers), the unit
prices, and the amount rounded half-up to the cent once per line.  The total is
the sum of the lines, so an invoice reconciles to the ledger to the cent.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Sequence

import pandas as pd

from billing.ledger import SpendRow
from billing.pricing import cost, to_cents

LINE_COLUMNS = [
    "tenant", "period", "model", "version", "service_tier", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
    "prompt_price_per_1m", "cached_prompt_price_per_1m", "completion_price_per_1m", "amount",
]  # fmt: skip


@dataclass(frozen=True)
class Invoice:
    tenant: str
    period: str
    currency: str
    lines: pd.DataFrame
    total: Decimal


def build_invoices(rows: Sequence[SpendRow], period: str, currency: str = "USD", tenant: str | None = None) -> list[Invoice]:
    """An invoice per tenant with usage in `period` (only `tenant`'s if given)."""
    frame = pd.DataFrame(
        [
            (
                r.tenant, r.period, r.model, r.version, r.service_tier, r.prompt_price, r.completion_price, r.prompt_price if r.cached_price is None else r.cached_price,
                r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
            )  # fmt: skip
            for r in rows
            if r.period == period and (tenant is None or r.tenant == tenant)
        ],
        columns=[
            "tenant", "period", "model", "version", "service_tier", "prompt_price_per_1m", "completion_price_per_1m", "cached_prompt_price_per_1m",
            "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
        ],  # fmt: skip
    )
    if frame.empty:
        return [] if tenant is None else [Invoice(tenant, period, currency, pd.DataFrame(columns=LINE_COLUMNS), Decimal("0.00"))]
    # Group on the prices' text so equal Decimals written differently ("0.10" / "0.1") fall in one line.
    frame["_pp"] = frame["prompt_price_per_1m"].map(lambda d: str(d.normalize()))
    frame["_cp"] = frame["completion_price_per_1m"].map(lambda d: str(d.normalize()))
    frame["_kp"] = frame["cached_prompt_price_per_1m"].map(lambda d: str(d.normalize()))
    grouped = (
        frame.groupby(["tenant", "period", "model", "version", "service_tier", "_pp", "_cp", "_kp"], sort=True)
        .agg(
            prompt_price_per_1m=("prompt_price_per_1m", "first"),
            completion_price_per_1m=("completion_price_per_1m", "first"),
            cached_prompt_price_per_1m=("cached_prompt_price_per_1m", "first"),
            requests=("requests", "sum"),
            prompt_tokens=("prompt_tokens", "sum"),
            cached_tokens=("cached_tokens", "sum"),
            completion_tokens=("completion_tokens", "sum"),
        )
        .reset_index()
    )
    grouped["amount"] = [
        to_cents(cost(pp, cp, int(p), int(c), int(k), kp))
        for pp, cp, kp, p, c, k in zip(
            grouped["prompt_price_per_1m"], grouped["completion_price_per_1m"], grouped["cached_prompt_price_per_1m"],
            grouped["prompt_tokens"], grouped["completion_tokens"], grouped["cached_tokens"],
        )  # fmt: skip
    ]
    invoices = []
    for name, lines in grouped.groupby("tenant", sort=True):
        lines = lines[LINE_COLUMNS].reset_index(drop=True)
        invoices.append(Invoice(str(name), period, currency, lines, sum(lines["amount"], Decimal("0.00"))))
    return invoices


def write_invoice(invoice: Invoice, path: Path, fmt: str = "csv") -> Path:
    """Write the lines (and a total line for CSV). Amounts stay exact: text in CSV, decimal128 in Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = invoice.lines.copy()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("tenant", pa.string()),
                ("period", pa.string()),
                ("model", pa.string()),
                ("version", pa.string()),
                ("service_tier", pa.string()),
                ("requests", pa.int64()),
                ("prompt_tokens", pa.int64()),
                ("cached_tokens", pa.int64()),
                ("completion_tokens", pa.int64()),
                ("prompt_price_per_1m", pa.decimal128(18, 6)),
                ("cached_prompt_price_per_1m", pa.decimal128(18, 6)),
                ("completion_price_per_1m", pa.decimal128(18, 6)),
                ("amount", pa.decimal128(18, 2)),
            ]
        )
        table = pa.Table.from_pandas(lines, schema=schema, preserve_index=False)
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), b"currency": invoice.currency.encode(), b"total": str(invoice.total).encode()}), path)
        return path
    path.write_text(invoice_csv(invoice))
    return path


def invoice_csv(invoice: Invoice, header: bool = True) -> str:
    """The invoice as CSV text: its lines, then a TOTAL line; amounts as exact decimal text."""
    lines = invoice.lines.copy()
    for col in ("prompt_price_per_1m", "cached_prompt_price_per_1m", "completion_price_per_1m", "amount"):
        lines[col] = lines[col].map(str)
    total = {c: "" for c in LINE_COLUMNS} | {"tenant": invoice.tenant, "period": invoice.period, "model": "TOTAL", "amount": str(invoice.total)}
    return pd.concat([lines, pd.DataFrame([total])], ignore_index=True).to_csv(index=False, header=header)


def read_invoice_csv(path: Path) -> tuple[pd.DataFrame, Decimal]:
    """Lines and total of an invoice CSV, amounts as Decimal (for reconciliation)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    total = Decimal(frame.loc[frame["model"] == "TOTAL", "amount"].iloc[0])
    lines = frame[frame["model"] != "TOTAL"].copy()
    for col in ("prompt_price_per_1m", "cached_prompt_price_per_1m", "completion_price_per_1m", "amount"):
        lines[col] = lines[col].map(Decimal)
    for col in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens"):
        lines[col] = lines[col].astype(int)
    return lines.reset_index(drop=True), total
