"""Billing configuration: the price book, the plans, the ledger's location and the quota leases.

These pydantic models are the `billing:` section of the one config root
(`cluster.config.MaasConfig`); amounts are `Decimal`, never float.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deployments.core.errors import InvalidRequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    prompt_per_1m: Decimal = Field(..., ge=0, description="Price of one million prompt (input) tokens, in the price book's currency.")
    completion_per_1m: Decimal = Field(..., ge=0, description="Price of one million completion (output) tokens.")


class ModelPrice(Price):
    versions: dict[str, Price] = Field(default_factory=dict, description="Optional per-version prices (e.g. `v3`) that override the model's price.")


class PriceBook(_Strict):
    currency: str = Field("USD", description="Currency of every amount (ISO 4217).")
    models: dict[str, ModelPrice] = Field(default_factory=dict, description="Prices per public model name.")

    def price_for(self, model: str, version: str | None = None) -> Price:
        """The price of `model` at `version` (a version's own price wins); unpriced models cannot be billed."""
        entry = self.models.get(model)
        if entry is None:
            raise InvalidRequestError(f"The model `{model}` has no price in the price book.", param="model", code="model_not_priced")
        if version and version in entry.versions:
            return entry.versions[version]
        return Price(prompt_per_1m=entry.prompt_per_1m, completion_per_1m=entry.completion_per_1m)


class Plan(_Strict):
    monthly_budget: Decimal | None = Field(None, ge=0, description="Most a tenant on this plan may spend per calendar month (UTC); null is unlimited.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute across all ingress replicas; null is unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt + worst-case completion, settled to actual); null is unlimited.")


class LeaseConfig(_Strict):
    budget_fraction: float = Field(0.02, gt=0, le=1, description="Budget an ingress replica leases at a time, as a fraction of the monthly budget (at least one request's worst case).")
    rate_fraction: float = Field(0.1, gt=0, le=1, description="Requests/tokens an ingress replica leases at a time, as a fraction of the per-minute limit (at least one).")
    refill_below: float = Field(0.5, ge=0, le=1, description="Ask for the next lease in the background once a lease falls below this fraction of a chunk.")
    idle_release_s: float = Field(10.0, gt=0, description="A replica hands back a tenant's unused budget lease after this many idle seconds.")
    holder_ttl_s: float = Field(30.0, gt=0, description="The billing actor drops the leases of a replica it has not heard from for this long.")
    restart_grace_s: float = Field(1.0, ge=0, description="After a restart the actor grants nothing for this long, so every replica re-reports its leases first.")


class BillingConfig(_Strict):
    enabled: bool = Field(True, description="Authenticate, admit and meter every /v1 request. Off: the API is open and nothing is billed.")
    ledger_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the ledger database. Default: SQLite (WAL) at ~/.cache/ray-maas/ledger.db, or MAAS_LEDGER_URL. "
        "Use a server (e.g. postgresql://...) when the ledger must survive the head node.",
    )
    actor_name: str = Field("maas-billing", description="Name of the detached billing actor.")
    namespace: str = Field("maas", description="Ray namespace of the billing actor.")
    flush_interval_s: float = Field(0.1, gt=0, le=1, description="How often each replica sends its batched usage events (and learns key changes).")
    max_batch: int = Field(5000, ge=1, description="Most usage events in one message to the billing actor.")
    pending_timeout_s: float = Field(60.0, gt=0, description="How long an aborted request waits for the engine's token count before it is closed with the tokens known.")
    default_plan: str = Field("free", description="Plan given to tenants created without one.")
    price_book: PriceBook = Field(default_factory=PriceBook, description="Prices per model (and version).")
    plans: dict[str, Plan] = Field(default_factory=lambda: {"free": Plan()}, description="Plans by name: budget and rate limits.")
    lease: LeaseConfig = Field(default_factory=LeaseConfig, description="How replicas lease quota from the billing actor.")

    def resolved_ledger_url(self) -> str:
        from cluster import envs

        if envs.MAAS_LEDGER_URL:
            return envs.MAAS_LEDGER_URL
        if self.ledger_url:
            return self.ledger_url
        path = Path("~/.cache/ray-maas/ledger.db").expanduser()
        return f"sqlite:///{path}"
