"""The catalogue as `/v1/models` and the console show it: each model with what it can do, its context window and
its price (OpenAI's model object plus `capabilities`, `context_window` and `pricing`; clients ignore what they do
not know). Plain data from the config; no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from common.config import MaasConfig, Price


@dataclass(frozen=True)
class Capabilities:
    chat: bool = True
    completions: bool = True
    embeddings: bool = False
    tools: bool = True  # `tool_choice: auto` answered (required and named need structured outputs)
    structured_outputs: bool = True  # `response_format` and forced tool calls enforced by the engine
    logprobs: bool = True
    fine_tuning: bool = False  # tenants may fine-tune it (a training price and the API on)

    @classmethod
    def embedding(cls) -> "Capabilities":
        """An embedding model: `/v1/embeddings` only."""
        return cls(chat=False, completions=False, embeddings=True, tools=False, structured_outputs=False, logprobs=False)

    @classmethod
    def of(cls, config: MaasConfig, fine_tune: bool = False) -> "Capabilities":
        """What the served chat model can do under `config` (`fine_tune`: a tenant's fine-tune of it, not fine-tunable again)."""
        book = config.billing.price_book.models.get(config.model.name)
        trainable = config.fine_tuning.enabled and (not config.billing.enabled or (book is not None and book.training_per_1m is not None))
        return cls(
            tools=config.model.tool_calls,
            structured_outputs=config.engine.structured_outputs,
            logprobs=config.engine.max_logprobs > 0,
            fine_tuning=trainable and not fine_tune,
        )


@dataclass(frozen=True)
class Listing:
    """What `/v1/models` says of the served model beyond its id: built from the config at the ingress's start."""

    capabilities: Capabilities = Capabilities()
    fine_tune_capabilities: Capabilities = Capabilities()
    context_window: int = 2048
    currency: str = "USD"
    price: Callable[[], Price | None] = lambda: None  # the stable version's price now (None: billing off)

    @classmethod
    def of(cls, config: MaasConfig, price: Callable[[], Price | None]) -> "Listing":
        return cls(Capabilities.of(config), Capabilities.of(config, fine_tune=True), config.engine.max_model_len, config.billing.price_book.currency, price)


def pricing(price: Price | None, currency: str) -> dict[str, Any] | None:
    """Per million tokens, as decimal strings (exact), with the cached-prompt price; None when nothing is billed."""
    if price is None:
        return None
    cached = price.cached_prompt_per_1m if price.cached_prompt_per_1m is not None else price.prompt_per_1m
    return {"currency": currency, "prompt_per_1m": str(price.prompt_per_1m), "cached_prompt_per_1m": str(cached), "completion_per_1m": str(price.completion_per_1m)}


def model_card(model_id: str, created: int, owned_by: str, capabilities: Capabilities, context_window: int, price: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra,
        "capabilities": asdict(capabilities), "context_window": context_window, "pricing": price,
    }  # fmt: skip
