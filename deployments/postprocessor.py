"""Serve deployment of the postprocessor stage over `deployments.core.postprocessor.ResponseWriter`.

It pulls the generator's token stream and turns it into OpenAI responses (detokenization, stop strings, shapes).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from common.logs import setup_logging
from deployments.core.postprocessor import ResponseWriter
from deployments.core.tokenizer import load_hf_tokenizer
from deployments.core.types import GenerationRequest
from deployments.handles import cancelling_stream

logger = logging.getLogger(__name__)


@serve.deployment
class Postprocessor:
    def __init__(self, generator: DeploymentHandle, model_path: str):
        setup_logging("postprocessor")
        backend = load_hf_tokenizer(model_path).backend_tokenizer  # the Rust tokenizer: decode is on the hot path
        self._logic = ResponseWriter(lambda ids: backend.decode(ids, skip_special_tokens=True))
        self._generator = generator.options(stream=True)

    def _tokens(self, req: GenerationRequest) -> AsyncIterator:
        return cancelling_stream(self._generator.generate.remote(req))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[tuple[str, dict | None]]:
        tokens = self._tokens(req)
        usage = None
        try:
            async for item in self._logic.stream(req, tokens):
                usage = item[1] or usage
                yield item
        finally:
            _log_end(req, usage)
            await tokens.aclose()  # type: ignore[attr-defined]

    async def complete(self, req: GenerationRequest) -> dict:
        tokens = self._tokens(req)
        usage = None
        try:
            result = await self._logic.complete(req, tokens)
            usage = result["usage"]
            return result
        finally:
            _log_end(req, usage)
            await tokens.aclose()  # type: ignore[attr-defined]


def _log_end(req: GenerationRequest, usage: dict | None) -> None:
    logger.info(
        "response %s", "finished" if usage else "ended early",
        extra={"request_id": req.request_id, "version": req.model_version, "stream": req.stream, "completion_tokens": usage["completion_tokens"] if usage else None},
    )
