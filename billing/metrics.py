"""Billing metrics on Ray's metrics endpoint (`ray.util.metrics`), created inside the actor or replica that reports them.

Names (Ray prefixes them with `ray_`): maas_billing_tokens_total{tenant,model,version,kind},
maas_billing_spend_total{tenant,model}, maas_billing_events_total, maas_billing_ledger_lag_seconds,
maas_billing_rejections_total{tenant,reason}, maas_billing_outbox_events.
"""

from __future__ import annotations

from decimal import Decimal

from ray.util import metrics


class RayBillingMetrics:
    """The billing actor's metrics (implements `billing.service.BillingMetrics`)."""

    def __init__(self) -> None:
        self.tokens = metrics.Counter("maas_billing_tokens", "Tokens metered into the ledger.", tag_keys=("tenant", "model", "version", "kind"))
        self.spend = metrics.Counter("maas_billing_spend", "Spend metered into the ledger, in the price book's currency.", tag_keys=("tenant", "model"))
        self.events = metrics.Counter("maas_billing_events", "Witness reports that changed the ledger (duplicates excluded).")
        self.lag = metrics.Gauge("maas_billing_ledger_lag_seconds", "Age of the oldest event in the last batch made durable.")
        self.rejections = metrics.Counter("maas_billing_rejections", "Lease asks the billing actor denied, by reason.", tag_keys=("tenant", "reason"))

    def on_usage(self, tenant: str, model: str, version: str, prompt_tokens: int, completion_tokens: int, amount: Decimal) -> None:
        # A witness's correction can lower a row (rare: see billing.witness); counters only rise, the ledger is exact.
        tags = {"tenant": tenant, "model": model, "version": version}
        if prompt_tokens > 0:
            self.tokens.inc(prompt_tokens, tags={**tags, "kind": "prompt"})
        if completion_tokens > 0:
            self.tokens.inc(completion_tokens, tags={**tags, "kind": "completion"})
        if amount > 0:
            self.spend.inc(float(amount), tags={"tenant": tenant, "model": model})

    def on_ingest(self, events: int, lag_s: float) -> None:
        if events:
            self.events.inc(events)
        self.lag.set(lag_s)

    def on_denied(self, tenant: str, reason: str) -> None:
        self.rejections.inc(1, tags={"tenant": tenant, "reason": reason})


class RayIngressMetrics:
    """An ingress replica's billing metrics: requests it rejected, and events waiting to be acknowledged."""

    def __init__(self) -> None:
        self.rejections = metrics.Counter("maas_requests_rejected", "Requests the ingress rejected, by reason.", tag_keys=("tenant", "reason"))
        self.outbox = metrics.Gauge("maas_billing_outbox_events", "Usage events an ingress replica holds until the billing actor acknowledges them.")

    def rejected(self, tenant: str, reason: str) -> None:
        self.rejections.inc(1, tags={"tenant": tenant or "-", "reason": reason})

    def outbox_size(self, queued: int) -> None:
        self.outbox.set(queued)
