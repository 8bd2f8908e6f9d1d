"""Pricing as pure functions: what a request may cost at most (to reserve) and what it did cost (to bill).

Amounts are exact `Decimal`s; prices are per million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from common.config import Plan, Price
from common.errors import PermissionDeniedError

MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


def cost(prompt_price: Decimal, completion_price: Decimal, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, cached_price: Decimal | None = None) -> Decimal:
    """Exact cost of a request (no rounding: rounding happens once, per invoice line). `cached_tokens` of the prompt
    tokens (those the engine's prefix cache held) cost `cached_price` each instead (None: the prompt price)."""
    if not cached_tokens:
        return (prompt_price * prompt_tokens + completion_price * completion_tokens) / MILLION
    cached_price = prompt_price if cached_price is None else cached_price
    return (prompt_price * (prompt_tokens - cached_tokens) + cached_price * cached_tokens + completion_price * completion_tokens) / MILLION


def price_text(price: Decimal | None) -> str:
    """A price as the ledger keeps it (Decimal as text; "" for none)."""
    return "" if price is None else str(price)


def price_of(text: str) -> Decimal | None:
    return Decimal(text) if text else None


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Quote:
    """The worst case of one request, reserved before it runs."""

    prompt_price: Decimal
    completion_price: Decimal
    prompt_tokens: int
    max_completion_tokens: int
    cached_price: Decimal | None = None  # a cached prompt token's price (known once the request ran; the worst case counts none)

    @property
    def worst_cost(self) -> Decimal:
        return cost(self.prompt_price, self.completion_price, self.prompt_tokens, self.max_completion_tokens)

    @property
    def worst_tokens(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens

    def actual_cost(self, completion_tokens: int, cached_tokens: int = 0, prompt_tokens: int | None = None) -> Decimal:
        """What the request cost; `prompt_tokens` where it is known only once it ran (an embedding's input, reserved by a bound)."""
        prompt = self.prompt_tokens if prompt_tokens is None else prompt_tokens
        return cost(self.prompt_price, self.completion_price, prompt, completion_tokens, cached_tokens, self.cached_price)


def quote(price: Price, prompt_tokens: int, max_tokens: int, n: int = 1) -> Quote:
    """Worst case: the prompt once, plus `max_tokens` for each of the `n` choices."""
    return Quote(price.prompt_per_1m, price.completion_per_1m, prompt_tokens, max_tokens * n, price.cached_prompt_per_1m)


@dataclass(frozen=True)
class TierChoice:
    """The service tier a request runs at, and its tenant's weight in the engine's fair share."""

    tier: str
    share_weight: float = 1.0


def choose_tier(plan: Plan, requested: str | None) -> TierChoice:
    """The tier of a request that asked for `requested` (None or `auto`: the plan's default). A tier the plan does not
    offer is a 403 naming the ones it does: never silently run at another tier, at another price."""
    if requested in (None, "auto"):
        return TierChoice(plan.default_service_tier, plan.share_weight)
    if requested not in plan.service_tiers:
        raise PermissionDeniedError(
            f"Your plan does not offer the `{requested}` service tier; it offers {', '.join(f'`{t}`' for t in plan.service_tiers)} (or `auto`).",
            param="service_tier",
            code="service_tier_not_allowed",
        )
    return TierChoice(requested, plan.share_weight)
