"""Admission as pure decisions over records: leases, reservations and grants.

Quota is global and leased.  The billing actor owns each tenant's limits and
grants *leases* (a slice of the monthly budget, of this minute's requests and of
this minute's tokens) to ingress replicas; a replica admits requests from its
lease without a round trip and asks for the next slice in the background.

Invariants the actor keeps (see `decide_grant`):
  spent + pending + Σ leases outstanding  ≤  monthly budget
  Σ requests (tokens) granted for a minute ≤  RPM (TPM)
so replicas together never exceed a limit; a replica's unused lease is at most
wasted, never double-spent.

Nothing here imports Ray; the actor and the replicas hold the state and call these.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from billing.pricing import Quote
from common.config import LeaseConfig, Plan

ZERO = Decimal(0)


def period_of(ts: float) -> str:
    """Billing period (calendar month, UTC) of a timestamp: `2026-11`."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m")


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def window_of(ts: float) -> int:
    """Rate-limit window: the minute since the epoch."""
    return int(ts // 60)


def seconds_left_in_window(ts: float) -> float:
    return 60.0 - (ts % 60.0)


def seconds_left_in_period(ts: float) -> float:
    now = datetime.fromtimestamp(ts, timezone.utc)
    nxt = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return nxt.timestamp() - ts


@dataclass(frozen=True)
class Ask:
    """What a replica is missing for a tenant: budget (an amount), requests and tokens of `window`."""

    tenant: str
    period: str
    window: int
    budget: Decimal = ZERO
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Grant:
    """The actor's answer to an Ask. None means unlimited; `denied` names the first limit that said no."""

    tenant: str
    period: str
    window: int
    budget: Decimal | None
    requests: int | None
    tokens: int | None
    denied: str | None = None  # "insufficient_quota" | "requests" | "tokens" | "unknown_tenant"
    retry_after_s: float = 0.0
    message: str = ""
    # The plan's rate limits and what the actor has not leased of this window yet (after this grant): the
    # replica's `x-ratelimit-*` headers are its own lease plus this (None: no limit).
    rpm: int | None = None
    tpm: int | None = None
    requests_left: int | None = None
    tokens_left: int | None = None


def decide_grant(plan: Plan, lease: LeaseConfig, ask: Ask, committed: Decimal, window_used: tuple[int, int], now: float) -> Grant:
    """Grant each missing dimension a chunk (at least what is missing) if the limit allows it, else deny.

    `committed` is spent + pending + every lease outstanding for the tenant this period;
    `window_used` is (requests, tokens) already granted in `ask.window`.
    """
    denied, message, retry = None, "", 0.0
    budget: Decimal | None = None
    if plan.monthly_budget is not None:
        available = plan.monthly_budget - committed
        if ask.budget > available:
            budget = ZERO
            denied, retry = "insufficient_quota", seconds_left_in_period(now)
            message = "You exceeded your current quota: the monthly budget is spent. Ask your operator to raise the plan's budget."
        elif ask.budget > 0:
            budget = min(available, max(ask.budget, plan.monthly_budget * Decimal(str(lease.budget_fraction))))
        else:
            budget = ZERO
    requests = _rate(plan.rpm, ask.requests, window_used[0], lease.rate_fraction)
    tokens = _rate(plan.tpm, ask.tokens, window_used[1], lease.rate_fraction)
    if denied is None and requests == 0 and ask.requests > 0:
        denied, retry = "requests", seconds_left_in_window(now)
        message = f"Rate limit reached on requests per minute (RPM): limit {plan.rpm}. Try again in {math.ceil(retry)}s."
    if denied is None and tokens == 0 and ask.tokens > 0:
        denied, retry = "tokens", seconds_left_in_window(now)
        if plan.tpm is not None and ask.tokens > plan.tpm:
            message = f"Request too large for tokens per minute (TPM): limit {plan.tpm}, requested {ask.tokens}. Lower max_tokens or the prompt."
        else:
            message = f"Rate limit reached on tokens per minute (TPM): limit {plan.tpm}. Try again in {math.ceil(retry)}s."
    left_r = None if plan.rpm is None else max(0, plan.rpm - window_used[0] - (requests or 0))
    left_t = None if plan.tpm is None else max(0, plan.tpm - window_used[1] - (tokens or 0))
    return Grant(ask.tenant, ask.period, ask.window, budget, requests, tokens, denied, retry, message, plan.rpm, plan.tpm, left_r, left_t)


def _rate(limit: int | None, need: int, used: int, fraction: float) -> int | None:
    if limit is None:
        return None
    available = limit - used
    if need <= 0:
        return 0
    if need > available:
        return 0
    return min(available, max(need, math.ceil(limit * fraction)))


@dataclass
class TenantLease:
    """A replica's lease for one tenant. None = unlimited; `in_flight` is reserved by running requests."""

    period: str = ""
    budget: Decimal | None = ZERO
    in_flight: Decimal = ZERO
    window: int = -1
    requests: int | None = 0
    tokens: int | None = 0
    last_used: float = field(default_factory=time.time)
    rpm: int | None = None  # the plan's limits, as the last grant said
    tpm: int | None = None
    pool_window: int = -1  # the window `pool_requests` / `pool_tokens` are of
    pool_requests: int | None = None  # what the actor had not leased of that window yet
    pool_tokens: int | None = None

    def roll(self, period: str, window: int) -> None:
        """A new month voids the budget lease; a new minute voids the rate leases."""
        if period != self.period:
            self.period, self.budget = period, ZERO
        if window != self.window:
            self.window, self.requests, self.tokens = window, 0, 0

    def claim(self) -> Decimal:
        """What the actor must count against the budget for this replica: unreserved lease + reservations."""
        return (self.budget or ZERO) + self.in_flight

    def apply(self, grant: Grant) -> None:
        if grant.period == self.period:
            self.budget = None if grant.budget is None else (self.budget or ZERO) + grant.budget
        if grant.window == self.window:
            self.requests = None if grant.requests is None else (self.requests or 0) + grant.requests
            self.tokens = None if grant.tokens is None else (self.tokens or 0) + grant.tokens
            self.pool_window, self.pool_requests, self.pool_tokens = grant.window, grant.requests_left, grant.tokens_left
        if grant.denied != "warming_up":
            self.rpm, self.tpm = grant.rpm, grant.tpm


@dataclass(frozen=True)
class RateState:
    """A tenant's rate limits as one replica sees them: OpenAI's `x-ratelimit-*` headers (None: no such limit).

    Remaining is this replica's unused lease plus what the actor had not leased of the minute at its last
    grant: other replicas' unused leases (at most `rate_fraction` of the limit each) count as used, and
    what they spent since that grant is not seen. Reset is the end of the current minute window.
    """

    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_s: float

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        reset = _duration(self.reset_s)
        for dim, limit, left in (("requests", self.limit_requests, self.remaining_requests), ("tokens", self.limit_tokens, self.remaining_tokens)):
            if limit is not None:
                out[f"x-ratelimit-limit-{dim}"] = str(limit)
                out[f"x-ratelimit-remaining-{dim}"] = str(left)
                out[f"x-ratelimit-reset-{dim}"] = reset
        return out


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `7s`, `1m0s`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def rate_state(lease: TenantLease, now: float) -> RateState:
    """The rate limits and what remains of them this minute, from a replica's lease (see RateState)."""
    window = window_of(now)
    fresh = lease.pool_window == window

    def remaining(limit: int | None, leased: int | None, pool: int | None) -> int | None:
        if limit is None:
            return None
        mine = (leased or 0) if lease.window == window else 0
        return max(0, min(limit, mine + ((pool or 0) if fresh else limit)))

    return RateState(
        lease.rpm, remaining(lease.rpm, lease.requests, lease.pool_requests),
        lease.tpm, remaining(lease.tpm, lease.tokens, lease.pool_tokens),
        seconds_left_in_window(now),
    )  # fmt: skip


def shortfall(lease: TenantLease, tenant: str, q: Quote, slot: bool = True) -> Ask | None:
    """What the lease lacks to admit a request quoted `q` (None: admit now); `slot=False`: its request slot is taken already."""
    budget = ZERO if lease.budget is None else max(ZERO, q.worst_cost - lease.budget)
    requests = 0 if lease.requests is None or not slot else max(0, 1 - lease.requests)
    tokens = 0 if lease.tokens is None else max(0, q.worst_tokens - lease.tokens)
    if budget == 0 and requests == 0 and tokens == 0:
        return None
    return Ask(tenant, lease.period, lease.window, budget, requests, tokens)


def refill(lease: TenantLease, tenant: str, chunk_hint: Quote, below: float) -> Ask | None:
    """A background ask when a lease runs low (below `below` × the last request's needs, at least one request)."""
    budget = ZERO if lease.budget is None or lease.budget >= chunk_hint.worst_cost * Decimal(1 + below) else chunk_hint.worst_cost
    requests = 0 if lease.requests is None or lease.requests > 1 else 1
    tokens = 0 if lease.tokens is None or lease.tokens >= chunk_hint.worst_tokens * (1 + below) else chunk_hint.worst_tokens
    if budget == 0 and requests == 0 and tokens == 0:
        return None
    return Ask(tenant, lease.period, lease.window, budget, requests, tokens)


@dataclass(frozen=True)
class Reservation:
    """One admitted request's hold on its tenant's lease, settled when the request ends."""

    tenant: str
    period: str
    window: int
    quote: Quote
    reserved: Decimal


def reserve(lease: TenantLease, tenant: str, q: Quote, slot: bool = True) -> Reservation:
    """Take the request's worst case from the lease (call only when `shortfall` is None); `slot=False` takes no request slot."""
    worst = q.worst_cost
    if lease.budget is not None:
        lease.budget -= worst
    lease.in_flight += worst
    if lease.requests is not None and slot:
        lease.requests -= 1
    if lease.tokens is not None:
        lease.tokens -= q.worst_tokens
    lease.last_used = time.time()
    return Reservation(tenant, lease.period, lease.window, q, worst)


def release(lease: TenantLease, r: Reservation) -> None:
    """Give a reservation back whole, e.g. for a request refused before it ran; its request slot stays used
    (a refused request was still a request)."""
    lease.in_flight -= r.reserved
    if lease.budget is not None and lease.period == r.period:
        lease.budget += r.reserved
    if lease.tokens is not None and lease.window == r.window:
        lease.tokens += r.quote.worst_tokens


def settle(lease: TenantLease, r: Reservation, completion_tokens: int | None, cached_tokens: int = 0, prompt_tokens: int | None = None) -> Decimal | None:
    """Release a reservation: the unused part returns to the lease. Unknown usage (an abort) returns nothing yet.

    `prompt_tokens`: the prompt's true count where the reservation held a bound (an embedding's input is
    reserved before it is tokenized). Returns the actual cost when known.
    """
    lease.in_flight -= r.reserved
    if completion_tokens is None:
        return None
    prompt = r.quote.prompt_tokens if prompt_tokens is None else min(prompt_tokens, r.quote.prompt_tokens)
    actual = r.quote.actual_cost(completion_tokens, cached_tokens, prompt)
    if lease.budget is not None and lease.period == r.period:
        lease.budget += r.reserved - actual
    if lease.tokens is not None and lease.window == r.window:
        lease.tokens += r.quote.worst_tokens - prompt - completion_tokens
    return actual
