"""Budget alerts as pure decisions: which thresholds a tenant's spend has crossed, the signed webhook, the retry schedule.

The billing actor holds the state (which alerts were queued, their deliveries, in the ledger's `alerts`
table) and calls these; a receiver checks a delivery with `verify`.  The signature follows the common
webhook scheme: header `X-Maas-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable

SIGNATURE_HEADER = "X-Maas-Signature"
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class Alert:
    """One threshold of one tenant's budget crossed in one period: sent once, whatever happens after."""

    tenant: str
    period: str
    threshold: str  # the fraction as text ("0.8"), part of the alert's identity
    spent: Decimal
    budget: Decimal
    currency: str

    def body(self, now: float) -> str:
        return json.dumps(
            {
                "type": "budget.threshold_crossed",
                "tenant": self.tenant,
                "period": self.period,
                "threshold": float(self.threshold),
                "spent": str(self.spent),
                "budget": str(self.budget),
                "currency": self.currency,
                "created": int(now),
            },
            separators=(",", ":"),
        )


def crossed(tenant: str, period: str, spent: Decimal, budget: Decimal | None, thresholds: Iterable[float], already: set[str], currency: str) -> list[Alert]:
    """The alerts due: every threshold the spend has reached that has not been queued this period (none without a budget)."""
    if budget is None or budget <= 0:
        return []
    out = []
    for t in thresholds:
        key = format(t, "g")
        if key not in already and spent >= budget * Decimal(key):
            out.append(Alert(tenant, period, key, spent, budget, currency))
    return out


def sign(secret: str, timestamp: int, body: str) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: str, now: float, tolerance_s: float = 300) -> bool:
    """Whether `header` signs `body` with `secret`, made within `tolerance_s` of `now` (a replayed old one fails)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    return abs(now - timestamp) <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), header)


def retry_at(now: float, attempts: int, backoff_s: float) -> float:
    """When to try again after `attempts` failed deliveries: backoff_s, doubled each time, at most MAX_BACKOFF_S."""
    return now + min(MAX_BACKOFF_S, backoff_s * 2 ** max(0, attempts - 1))


def post(url: str, body: str, secret: str, alert_id: int, now: float, timeout_s: float) -> str | None:
    """One signed delivery (plain HTTP, no Ray): None when the receiver answered 2xx, else what went wrong."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, int(now), body), "X-Maas-Alert-Id": str(alert_id), "User-Agent": "ray-maas-alerts"}
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - an operator-configured URL
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except Exception as exc:  # refused, timed out, bad URL: retried later
        return f"{type(exc).__name__}: {exc}"[:300]
