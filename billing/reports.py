"""Usage reports as pure functions over ledger rows: what `/v1/usage`, `/admin/usage`, `maas usage` and the actor's totals show.

`tally` is the one accumulator: requests, tokens and exact cost summed per any key of a row.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Hashable, Sequence, TypeVar

from billing.ledger import SpendRow

K = TypeVar("K", bound=Hashable)


@dataclass
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    amount: Decimal = Decimal(0)
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache held (priced apart)

    def add(self, row: SpendRow) -> None:
        self.requests += row.requests
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cached_tokens += row.cached_tokens
        self.amount += row.amount


def tally(rows: Sequence[SpendRow], key: Callable[[SpendRow], K]) -> dict[K, Tally]:
    """Rows summed per `key(row)`, keys in sorted order."""
    acc: dict[K, Tally] = defaultdict(Tally)
    for r in rows:
        acc[key(r)].add(r)
    return dict(sorted(acc.items()))


def _breakdown(rows: Sequence[SpendRow], name: str, key: Callable[[SpendRow], str]) -> list[dict]:
    """One entry per `key` (a day, `model@version`, a tenant) with its requests, tokens and cost: the charts' numbers."""
    return [
        {name: k, "requests": a.requests, "prompt_tokens": a.prompt_tokens, "cached_tokens": a.cached_tokens, "completion_tokens": a.completion_tokens,
         "total_tokens": a.prompt_tokens + a.completion_tokens, "cost": str(a.amount)}
        for k, a in tally(rows, key).items()
    ]  # fmt: skip


def usage_report(rows: Sequence[SpendRow], period: str, currency: str, tenant: str | None = None, by_user: bool = False) -> dict:
    """Requests, tokens and exact cost by tenant, day, model, version and service tier, and by end user (`user`) when asked
    (amounts as decimal strings).

    `by_day`, `by_model`, `by_tier` and `by_tenant` are the same rows summed one way each (what the console's charts draw); each sums to `total`.
    """
    kept = [r for r in rows if r.period == period and (tenant is None or r.tenant == tenant)]
    data = [
        {
            "tenant": t, "day": d, "model": m, "version": v, "service_tier": s, **({"user": u} if by_user else {}), "requests": a.requests, "prompt_tokens": a.prompt_tokens,
            "cached_tokens": a.cached_tokens, "completion_tokens": a.completion_tokens, "total_tokens": a.prompt_tokens + a.completion_tokens, "cost": str(a.amount),
        }
        for (t, d, m, v, s, u), a in tally(kept, lambda r: (r.tenant, r.day, r.model, r.version, r.service_tier, r.end_user)).items()
    ]  # fmt: skip
    total = tally(kept, lambda r: 0).get(0, Tally())
    return {
        "object": "usage", "period": period, "currency": currency, "tenant": tenant, "data": data,
        "by_day": _breakdown(kept, "day", lambda r: r.day or ""), "by_model": _breakdown(kept, "model", lambda r: f"{r.model}@{r.version}"),
        "by_tier": _breakdown(kept, "service_tier", lambda r: r.service_tier), "by_tenant": _breakdown(kept, "tenant", lambda r: r.tenant),
        "total": {"requests": total.requests, "prompt_tokens": total.prompt_tokens, "cached_tokens": total.cached_tokens, "completion_tokens": total.completion_tokens, "cost": str(total.amount)},
    }  # fmt: skip
