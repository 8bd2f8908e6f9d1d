"""Prompt preparation: chat template, token ids, and the context-window check."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

from common.errors import ContextLengthExceededError, InvalidRequestError
from deployments.core.types import TokenizedPrompt

logger = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the stages use."""

    eos_token_id: int | None
    vocab_size: int

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def load_hf_tokenizer(model_path: str | Path) -> TokenizerLike:
    """Load the tokenizer saved beside a model in the store (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)


def fit_context(num_prompt_tokens: int, requested: int | None, max_model_len: int) -> int:
    """The completion budget for a prompt, or ContextLengthExceededError if it cannot fit the window."""
    available = max_model_len - num_prompt_tokens
    if requested is None:
        if available < 1:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, leaving no room for a completion. Please reduce the length of the prompt.",
                param="messages",
            )
        return available
    if requested > available:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for the completion). "
            "Please reduce the length of the prompt or the max_tokens.",
            param="max_tokens",
        )
    return requested


class PromptTokenizer:
    """Turns chat messages or a text prompt into token ids that fit the model's context window."""

    def __init__(self, tokenizer: TokenizerLike, max_model_len: int):
        self._tok = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_id = tokenizer.eos_token_id
        self._stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # template errors are the caller's (e.g. roles the template refuses)
            raise InvalidRequestError(f"Messages could not be rendered with the model's chat template: {exc}", param="messages") from exc
        return list(ids)

    def encode_text(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tok.encode(prompt, add_special_tokens=False))
        bad = [t for t in prompt if not 0 <= t < self._tok.vocab_size]
        if bad:
            raise InvalidRequestError(f"Prompt token ids out of the vocabulary (0..{self._tok.vocab_size - 1}): {bad[:5]}", param="prompt")
        return list(prompt)

    def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None) -> TokenizedPrompt:
        return self._finish(self.encode_chat(messages), max_tokens)

    def prepare_completion(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return self._finish(self.encode_text(prompt), max_tokens)

    def _finish(self, ids: list[int], max_tokens: int | None) -> TokenizedPrompt:
        if not ids:
            raise InvalidRequestError("The prompt is empty after tokenization.", param="prompt")
        return TokenizedPrompt(ids, fit_context(len(ids), max_tokens, self.max_model_len), list(self._stop_ids))


class TokenizingClient(Protocol):
    """The tokenizer stage as its callers see it (`deployments.openai.service.TokenizerClient`)."""

    async def prepare_chat(self, messages: list[dict[str, Any]], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt: ...

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt: ...


class NearTokenizer:
    """Tokenizes short prompts where the caller runs, and sends long ones to the tokenizer stage.

    The round trip to the tokenizer stage costs about 4 ms at p50 (two Serve calls) where tokenizing a
    short prompt costs 0.1 ms (`bench/RESULTS.md`, "Where the first token's time goes"), so a prompt of up
    to `max_chars` characters (all messages together) is tokenized by the ingress itself, and only long
    ones, whose tokenizing would hold the ingress's event loop, go to the stage that scales on its own.
    Both give the same `TokenizedPrompt` and raise the same errors: they run the same `PromptTokenizer`.
    """

    def __init__(self, local: PromptTokenizer | None, remote: TokenizingClient, max_chars: int):
        self._local = local if max_chars > 0 else None
        self._remote = remote
        self._max_chars = max_chars
        self.inline = self.remote = 0  # prompts tokenized each way

    async def prepare_chat(self, messages: list[dict[str, Any]], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        if self._local is not None and sum(len(str(m.get("content") or "")) for m in messages) <= self._max_chars:
            self.inline += 1
            return self._local.prepare_chat(messages, max_tokens)
        self.remote += 1
        return await self._remote.prepare_chat(messages, max_tokens, request_id)

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        if self._local is not None and len(prompt) <= self._max_chars:
            self.inline += 1
            return self._local.prepare_completion(prompt, max_tokens)
        self.remote += 1
        return await self._remote.prepare_completion(prompt, max_tokens, request_id)
