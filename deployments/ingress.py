"""Serve deployment of the OpenAI-compatible ingress: FastAPI routes over `OpenAIService`, wired to the other stages' handles."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments._handles import cancelling_stream
from deployments.core.types import GenerationRequest, TokenizedPrompt
from deployments.openai.routes import build_app
from deployments.openai.service import OpenAIService

logger = logging.getLogger(__name__)


class _TokenizerClient:
    def __init__(self, handle: DeploymentHandle):
        self._h = handle

    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None) -> TokenizedPrompt:
        return await self._h.prepare_chat.remote(messages, max_tokens)

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return await self._h.prepare_completion.remote(prompt, max_tokens)


class _PostprocessorClient:
    def __init__(self, handle: DeploymentHandle):
        self._h = handle
        self._stream_h = handle.options(stream=True)

    def stream(self, req: GenerationRequest) -> AsyncIterator[tuple[str, dict | None]]:
        return cancelling_stream(self._stream_h.stream.remote(req))

    async def complete(self, req: GenerationRequest) -> dict:
        return await self._h.complete.remote(req)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, tokenizer: DeploymentHandle, postprocessor: DeploymentHandle, generator: DeploymentHandle, model_name: str):
        self._engine_ready = False
        self._service = OpenAIService(model_name, _TokenizerClient(tokenizer), _PostprocessorClient(postprocessor), is_ready=lambda: self._engine_ready)
        self._watch = asyncio.get_running_loop().create_task(self._wait_for_engine(generator))

    async def _wait_for_engine(self, generator: DeploymentHandle) -> None:
        """Answer 503 until a generator replica reports its engine loaded (once; Serve routes around later restarts)."""
        while not self._engine_ready:
            try:
                self._engine_ready = await generator.ready.remote()
            except Exception as exc:  # generator not deployed yet, or restarting
                logger.debug("generator not ready: %s", exc)
            if not self._engine_ready:
                await asyncio.sleep(1.0)
        logger.info("generator ready; accepting requests")

    def __serve_build_asgi_app__(self):
        return build_app(self._service)
