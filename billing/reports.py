"""Usage reports as pure functions over ledger rows: what `/v1/usage`, `/admin/usage` and `maas usage` show."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Sequence

from billing.ledger import SpendRow


def usage_report(rows: Sequence[SpendRow], period: str, currency: str, tenant: str | None = None) -> dict:
    """Requests, tokens and exact cost by tenant, day, model and version (amounts as decimal strings)."""
    acc: dict[tuple[str, str, str, str], list] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
    for r in rows:
        if r.period != period or (tenant is not None and r.tenant != tenant):
            continue
        a = acc[(r.tenant, r.day, r.model, r.version)]
        a[0] += r.requests
        a[1] += r.prompt_tokens
        a[2] += r.completion_tokens
        a[3] += r.amount
    data = [
        {"tenant": t, "day": d, "model": m, "version": v, "requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cost": str(amount)}
        for (t, d, m, v), (n, p, c, amount) in sorted(acc.items())
    ]
    total = {
        "requests": sum(x["requests"] for x in data),
        "prompt_tokens": sum(x["prompt_tokens"] for x in data),
        "completion_tokens": sum(x["completion_tokens"] for x in data),
        "cost": str(sum((Decimal(x["cost"]) for x in data), Decimal(0))),
    }
    return {"object": "usage", "period": period, "currency": currency, "tenant": tenant, "data": data, "total": total}
