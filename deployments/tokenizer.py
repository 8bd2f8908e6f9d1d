"""Serve deployment of the tokenizer stage (chat template, token ids, context check) over `PromptTokenizer`."""

from __future__ import annotations

from ray import serve

from deployments.core.tokenizer import PromptTokenizer, load_hf_tokenizer
from deployments.core.types import TokenizedPrompt


@serve.deployment
class Tokenizer:
    def __init__(self, model_path: str, max_model_len: int):
        self._logic = PromptTokenizer(load_hf_tokenizer(model_path), max_model_len)

    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None) -> TokenizedPrompt:
        return self._logic.prepare_chat(messages, max_tokens)

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return self._logic.prepare_completion(prompt, max_tokens)
