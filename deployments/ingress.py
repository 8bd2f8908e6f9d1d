"""Serve deployment of the OpenAI-compatible ingress: FastAPI routes over `OpenAIService`, wired to the other stages' handles.

With billing on, each replica holds a `BillingClient` connected to the named
billing actor: keys are checked locally, quota is leased, usage is batched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from billing.catalog import BillingConfig
from deployments._handles import cancelling_stream
from deployments.core.types import GenerationRequest, TokenizedPrompt
from deployments.openai.accounts import AccountsService
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
    def __init__(self, tokenizer: DeploymentHandle, postprocessor: DeploymentHandle, generator: DeploymentHandle, model_name: str, model_version: str, billing: dict):
        self._engine_ready = False
        config = BillingConfig.model_validate(billing)
        self._billing = self._accounts = None
        price = on_reject = None
        if config.enabled:
            from billing import actor
            from billing.client import BillingClient
            from billing.metrics import RayIngressMetrics

            handle = actor.get_or_create(config)
            handle.configure.remote(config.model_dump(mode="json"), "deploy")
            holder = serve.get_replica_context().replica_id.unique_id
            self._billing = BillingClient(config, actor.ActorTransport(handle), holder)
            self._metrics = RayIngressMetrics()
            on_reject = self._metrics.rejected
            price = config.price_book.price_for(model_name, model_version)

            async def call(method: str, *args):
                return await handle.call.remote(method, *args)

            self._accounts = AccountsService(call, config.price_book.currency, time.time)
            asyncio.get_running_loop().create_task(self._billing.start(timeout_s=600))
        self._service = OpenAIService(
            model_name,
            _TokenizerClient(tokenizer),
            _PostprocessorClient(postprocessor),
            is_ready=self._ready,
            billing=self._billing,
            price=price,
            model_version=model_version,
            on_reject=on_reject or (lambda tenant, reason: None),
        )
        self._watch = asyncio.get_running_loop().create_task(self._wait_for_engine(generator))

    def _ready(self) -> bool:
        return self._engine_ready and (self._billing is None or self._billing.synced)

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
        return build_app(self._service, self._accounts)

    async def __del__(self) -> None:
        if self._billing is not None:
            await self._billing.close()
