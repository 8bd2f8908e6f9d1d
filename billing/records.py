"""Records that cross the wire to and from the billing actor.

Usage events are NamedTuples (cheap to pickle in batches of thousands); the rest
are small frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from billing.pricing import cost, price_of
from billing.quota import Ask, Grant


class UsageEvent(NamedTuple):
    """One request's usage, idempotent on `request_id`.

    Two witnesses send these (`billing.witness`): the ingress, and the generator that ran the request.
    From the ingress, `completion_tokens` is the usage its response carried, or None when the request ended
    without one (client gone, failure mid-way); `delivered_tokens` is then what reached the client. From the
    generator, `completion_tokens` is what the engine produced.
    """

    request_id: str
    ts: float
    tenant: str
    key_id: str
    model: str
    version: str
    kind: str  # chat | completion
    status: str  # ok | aborted | error
    prompt_tokens: int
    completion_tokens: int | None
    prompt_price: str  # Decimal as text: per 1M tokens, at the time of the request
    completion_price: str
    reserved: str  # the worst case reserved at admission (Decimal as text)
    holder: str  # the ingress replica that reserved it
    delivered_tokens: int | None = None  # the ingress's witness: completion tokens that reached the client
    end_user: str = ""  # the request's `user`: the tenant's own end user, for its usage breakdown
    cached_tokens: int = 0  # of `prompt_tokens`, those the engine's prefix cache held (the engine's own count)
    cached_price: str = ""  # per 1M cached prompt tokens (Decimal as text; "": the prompt price)
    service_tier: str = "default"  # the tier it ran at (priority | default | flex | batch): its prices are that tier's

    def amount(self) -> Decimal:
        """Exact cost of the row's tokens at its prices (a completion count not known yet counts 0)."""
        return cost(Decimal(self.prompt_price), Decimal(self.completion_price), self.prompt_tokens, self.completion_tokens or 0, self.cached_tokens, price_of(self.cached_price))


class BillingContext(NamedTuple):
    """Who pays for a request and at what prices: sent with it to the generator, the second witness."""

    tenant: str
    key_id: str
    model: str
    version: str
    kind: str
    prompt_price: str
    completion_price: str
    reserved: str
    holder: str
    end_user: str = ""
    cached_price: str = ""
    service_tier: str = "default"
    request_id: str = ""  # the ledger's id for the request, when the engine's differs (a batch line's attempt): both witnesses report under it

    def event(
        self, request_id: str, ts: float, status: str, prompt_tokens: int, completion_tokens: int | None, delivered_tokens: int | None = None, cached_tokens: int = 0
    ) -> UsageEvent:
        return UsageEvent(
            self.request_id or request_id, ts, self.tenant, self.key_id, self.model, self.version, self.kind, status, prompt_tokens, completion_tokens,
            self.prompt_price, self.completion_price, self.reserved, self.holder, delivered_tokens, self.end_user, cached_tokens, self.cached_price,
            self.service_tier,
        )  # fmt: skip


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: only its hash, plus a short visible prefix (`key_id`) for support."""

    key_id: str
    key_hash: str
    tenant: str
    role: str  # tenant | admin
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    seq: int = 0  # change counter: replicas sync keys changed since their last seq
    name: str = ""
    # The key's own policy, inside its tenant's plan: models it may call (empty: all), and limits of its own.
    models: tuple[str, ...] = ()
    monthly_budget: Decimal | None = None
    rpm: int | None = None
    tpm: int | None = None
    metadata: str = ""  # free-form JSON object, the operator's
    plan: str = ""  # its tenant's plan, as the ledger holds it when the key is synced ("": the default plan); not stored with the key

    def valid_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    @property
    def limited(self) -> bool:
        """Whether the key has limits of its own (then it is admitted against them too, as a subject of its own)."""
        return self.monthly_budget is not None or self.rpm is not None or self.tpm is not None

    @property
    def subject(self) -> str:
        """The name its own leases and spend go by: `<tenant>#<key id>` (tenant names cannot hold `#`)."""
        return key_subject(self.tenant, self.key_id)


def key_subject(tenant: str, key_id: str) -> str:
    return f"{tenant}#{key_id}"


def split_subject(subject: str) -> tuple[str, str | None]:
    """(tenant, key id) of a lease subject; key id None for a tenant's own."""
    tenant, _, key_id = subject.partition("#")
    return tenant, key_id or None


@dataclass(frozen=True)
class Claim:
    """A replica's outstanding budget lease for a tenant (unreserved + reserved by running requests)."""

    tenant: str
    period: str
    amount: Decimal


@dataclass(frozen=True)
class SyncRequest:
    """Every `flush_interval_s`, each ingress replica sends one of these (and sooner when a lease runs out)."""

    holder: str
    events: list[UsageEvent] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    asks: list[Ask] = field(default_factory=list)
    keys_since: int = 0


@dataclass(frozen=True)
class SyncReply:
    acked: int  # how many of the request's events are durable (all of them, or the call failed)
    grants: list[Grant]
    keys: list[KeyRecord]  # keys changed since `keys_since`
    keys_seq: int
