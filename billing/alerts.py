"""Budget alerts as pure decisions: which thresholds a tenant's spend has crossed, the signed webhook, the retry schedule.

The billing actor holds the state (which alerts were queued, their deliveries, in the ledger's `alerts`
table) and calls these; a receiver checks a delivery with `verify`.  The signature follows the common
webhook scheme: header `X-Maas-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, and
the body itself carries the alert's `id` and the delivery's `timestamp`, so neither can be changed
without breaking the signature.

Each tenant's deliveries are signed with a secret of its own, `tenant_secret(MAAS_WEBHOOK_SECRET,
tenant)` (an HMAC of the tenant's name under the operator's secret): a tenant given its secret to
verify deliveries cannot sign another tenant's. Deliveries never follow a redirect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable

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


def tenant_secret(master: str, tenant: str) -> str:
    """The secret that signs `tenant`'s alerts (give it to that tenant's receiver): derived, so nothing new is stored."""
    return "whsec_" + hmac.new(master.encode(), f"ray-maas alerts/{tenant}".encode(), hashlib.sha256).hexdigest()


def delivery_body(body: str, alert_id: int, now: float) -> str:
    """What is sent and signed: the alert with its id and this delivery's time inside."""
    return json.dumps({**json.loads(body), "id": alert_id, "timestamp": int(now)}, separators=(",", ":"))


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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # the 3xx is the answer: a receiver cannot send a signed alert (and a request) to another host


def post(url: str, body: str, secret: str, alert_id: int, now: float, timeout_s: float) -> str | None:
    """One signed delivery (plain HTTP, no Ray, no redirects followed): None when the receiver answered 2xx, else what went wrong."""
    payload = delivery_body(body, alert_id, now)
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, int(now), payload), "X-Maas-Alert-Id": str(alert_id), "User-Agent": "ray-maas-alerts"}
    request = urllib.request.Request(url, data=payload.encode(), headers=headers, method="POST")
    try:
        with urllib.request.build_opener(_NoRedirects).open(request, timeout=timeout_s) as response:  # noqa: S310 - an operator-configured URL
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}" + (" (redirects are not followed)" if 300 <= exc.code < 400 else "")
    except Exception as exc:  # refused, timed out, bad URL: retried later
        return f"{type(exc).__name__}: {exc}"[:300]
