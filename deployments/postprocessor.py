"""Serve deployment of the postprocessor stage: it pulls the generator's token stream and turns it into OpenAI responses."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments._handles import cancelling_stream
from deployments.core.postprocess import Postprocessor as PostprocessorLogic
from deployments.core.tokenizer import load_hf_tokenizer
from deployments.core.types import GenerationRequest


@serve.deployment
class Postprocessor:
    def __init__(self, generator: DeploymentHandle, model_path: str):
        backend = load_hf_tokenizer(model_path).backend_tokenizer  # the Rust tokenizer: decode is on the hot path
        self._logic = PostprocessorLogic(lambda ids: backend.decode(ids, skip_special_tokens=True))
        self._generator = generator.options(stream=True)

    def _tokens(self, req: GenerationRequest) -> AsyncIterator:
        return cancelling_stream(self._generator.generate.remote(req))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[tuple[str, dict | None]]:
        tokens = self._tokens(req)
        try:
            async for item in self._logic.stream(req, tokens):
                yield item
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]

    async def complete(self, req: GenerationRequest) -> dict:
        tokens = self._tokens(req)
        try:
            return await self._logic.complete(req, tokens)
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]
