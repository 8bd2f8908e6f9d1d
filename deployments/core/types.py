"""Records passed between the stages (ingress → tokenizer → generator → postprocessor).

They cross process boundaries on every request, so they are small dataclasses of
plain values; the generator's stream messages are bare tuples for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from billing.records import BillingContext
from deployments.core.tools import ToolCall, ToolSpec

# One generator stream message: for each choice that advanced, (choice index, new token ids, finish reason),
# and, only when the request asked for logprobs, a fourth element: one `TokenLogprob` per new token.
# finish reason is None while generating, else "stop" | "length" | "abort".
TokenDelta = tuple  # (int, list[int], str | None) or (int, list[int], str | None, list[TokenLogprob])

# The choice index of the one delta that carries the prompt's logprobs (text completions' `echo` with `logprobs`):
# (PROMPT_LOGPROBS, [], None, one TokenLogprob per prompt token after the first, which has none), first in the
# message of the request's first engine step.
PROMPT_LOGPROBS = -1

# The choice index of the one delta that says how many prompt tokens the engine's prefix cache held (vLLM's
# `num_cached_tokens`): (CACHED_PROMPT, [], None, count), in the message of the request's first engine step,
# only when the count is above 0.
CACHED_PROMPT = -2

# The sampled token's logprob, then the most likely tokens at that position as (token id, logprob), best first.
TokenLogprob = tuple[float, list[tuple[int, float]]]

# One piece of a streamed response: its SSE text, then the completion tokens sent so far (all choices) or,
# on the last piece, the usage dict.  The ingress bills the count as a floor if the stream is cut.
SSEPiece = tuple[str, "int | dict"]


def piece_usage(piece: SSEPiece) -> dict | None:
    """The usage a piece carries (only the last one does)."""
    return piece[1] if isinstance(piece[1], dict) else None


@dataclass(frozen=True)
class TokenizedPrompt:
    """What the tokenizer returns: the prompt's ids and the completion budget that fits the context window."""

    prompt_token_ids: list[int]
    max_tokens: int
    stop_token_ids: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the generator and postprocessor need for one request."""

    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    prompt_token_ids: list[int]
    max_tokens: int
    created: int
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k most likely tokens' logprobs
    echo: bool = False  # text completions: the prompt's text comes before the completion
    prompt_logprobs: int | None = None  # `echo` with `logprobs`: the prompt tokens' logprobs too, with this many top ones
    prompt_only: bool = False  # `echo` with max_tokens 0: the engine makes its one token (billed), the answer shows the prompt only
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    group: str = ""  # a list of prompts: the request id the response is named by (each prompt is a sub-request)
    choice_offset: int = 0  # a list of prompts: this prompt's choices are numbered from here
    model_version: str = ""  # the store version serving it; responses name it in `system_fingerprint`
    adapter: tuple[str, str] | None = None  # a fine-tune: (its model id, its LoRA adapter folder) applied on the base
    billing: BillingContext | None = None  # who pays: the generator reports the engine's count with it
    tools: ToolSpec | None = None  # chat with tools: how the postprocessor finds the calls in the answer (deployments.core.tools)
    service_tier: str = "default"  # the tier it runs at: priority | default | flex | batch (deployments.core.scheduling)
    share_weight: float = 1.0  # its tenant's plan's weight in the engine's fair share

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + (self.group or self.request_id)


@dataclass(frozen=True)
class ChoiceEvent:
    """Text for one choice and its finish reason: news in a stream (`first` on a choice's first piece), or a whole answer."""

    index: int
    text: str
    finish_reason: str | None
    first: bool = False
    logprobs: list["DecodedLogprob"] | None = None  # for the tokens behind `text`, when the request asked for them
    tool_calls: list[ToolCall] | None = None  # the calls the answer made (with finish_reason `tool_calls`)


@dataclass(frozen=True)
class DecodedLogprob:
    """One token's logprob as a client sees it: its text, and the top alternatives' texts (None for a prompt's first
    token, which nothing precedes)."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None
    offset: int = 0  # where the token's text starts in the choice's text (text completions' `text_offset`)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache held (billed at the cached price)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens, self.cached_tokens + other.cached_tokens)

    @classmethod
    def from_dict(cls, usage: dict) -> "Usage":
        return cls(usage["prompt_tokens"], usage["completion_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))

    def to_dict(self) -> dict:
        """OpenAI's usage object, `prompt_tokens_details.cached_tokens` included (0 when none were cached)."""
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }  # fmt: skip
