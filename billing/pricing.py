"""Pricing as pure functions: what a request may cost at most (to reserve) and what it did cost (to bill).

Amounts are exact `Decimal`s; prices are per million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from common.config import Price

MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


def cost(prompt_price: Decimal, completion_price: Decimal, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Exact cost of a request (no rounding: rounding happens once, per invoice line)."""
    return (prompt_price * prompt_tokens + completion_price * completion_tokens) / MILLION


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Quote:
    """The worst case of one request, reserved before it runs."""

    prompt_price: Decimal
    completion_price: Decimal
    prompt_tokens: int
    max_completion_tokens: int

    @property
    def worst_cost(self) -> Decimal:
        return cost(self.prompt_price, self.completion_price, self.prompt_tokens, self.max_completion_tokens)

    @property
    def worst_tokens(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens

    def actual_cost(self, completion_tokens: int) -> Decimal:
        return cost(self.prompt_price, self.completion_price, self.prompt_tokens, completion_tokens)


def quote(price: Price, prompt_tokens: int, max_tokens: int, n: int = 1) -> Quote:
    """Worst case: the prompt once, plus `max_tokens` for each of the `n` choices."""
    return Quote(price.prompt_per_1m, price.completion_per_1m, prompt_tokens, max_tokens * n)
