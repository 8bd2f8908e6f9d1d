"""Serve deployment of the tokenizer stage (chat template, token ids, context check) over `PromptTokenizer`."""

from __future__ import annotations

import logging
import time

from ray import serve

from common.logs import setup_logging
from deployments.core.tokenizer import PromptTokenizer, load_hf_tokenizer
from deployments.core.types import TokenizedPrompt

logger = logging.getLogger(__name__)


@serve.deployment
class Tokenizer:
    def __init__(self, model_path: str, max_model_len: int):
        setup_logging("tokenizer")
        self._logic = PromptTokenizer(load_hf_tokenizer(model_path), max_model_len)

    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        return self._logged(request_id, "chat", lambda: self._logic.prepare_chat(messages, max_tokens))

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        return self._logged(request_id, "completion", lambda: self._logic.prepare_completion(prompt, max_tokens))

    @staticmethod
    def _logged(request_id: str, kind: str, prepare) -> TokenizedPrompt:
        start = time.time()
        try:
            prompt = prepare()
        except Exception as exc:
            logger.info("prompt refused: %s", exc, extra={"request_id": request_id, "kind": kind})
            raise
        trace = {"tokenizer_start": start, "tokenizer_end": time.time()}
        logger.info("prompt tokenized", extra={"request_id": request_id, "kind": kind, "prompt_tokens": prompt.num_prompt_tokens, "trace": trace})
        return prompt
