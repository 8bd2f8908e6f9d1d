"""Records that cross the wire to and from the billing actor.

Usage events are NamedTuples (cheap to pickle in batches of thousands); the rest
are small frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from billing.quota import Ask, Grant


class UsageEvent(NamedTuple):
    """One request's usage, idempotent on `request_id`.

    `completion_tokens` is None when the request ended without the ingress seeing
    its usage (client gone, failure mid-way): the generator's own count fills it in.
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


class EngineCount(NamedTuple):
    """What the engine actually produced for a request that did not finish normally."""

    request_id: str
    completion_tokens: int
    ts: float


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

    def valid_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


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
