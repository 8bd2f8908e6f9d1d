"""Adapters between Serve deployment handles and the plain async interfaces the stages' logic expects.

The logic (`deployments.openai.service`, `deployments.core.*`) talks to other stages through small
protocols; these classes implement them over Serve handles, so the logic never imports Ray.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ray.serve.handle import DeploymentHandle

from deployments.core.relay import Receiver
from deployments.core.types import GenerationRequest, TokenizedPrompt


async def cancelling_stream(response_gen: Any) -> AsyncIterator[Any]:
    """Iterate a Serve streaming response; cancel the remote call if we stop early or are cancelled.

    Cancelling the handle call cancels the callee's generator, which (for the
    generator stage) aborts the vLLM request and frees its batch slot.
    """
    finished = False
    try:
        async for item in response_gen:
            yield item
        finished = True
    finally:
        if not finished:
            response_gen.cancel()


class TokenizerHandleClient:
    """`deployments.openai.service.TokenizerClient` over the tokenizer deployment."""

    def __init__(self, handle: DeploymentHandle):
        self._h = handle

    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        return await self._h.prepare_chat.remote(messages, max_tokens, request_id)

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        return await self._h.prepare_completion.remote(prompt, max_tokens, request_id)


class RelayClient:
    """The receiving end of a batched return path (`deployments.core.relay`) over a Serve handle.

    The upstream deployment has a streaming `method(req, consumer)` (the request's control stream)
    and `carry(consumer, epoch, replica=...)`, and routes with `deployments.routing.PinnedRouter`;
    `consumer` is this replica's id. Serve routes each request; its items come back on the carrier.
    """

    def __init__(self, handle: DeploymentHandle, method: str, consumer: str):
        self._h = handle.options(stream=True)
        self._method = getattr(self._h, method)
        self._consumer = consumer
        self._receiver = Receiver(lambda replica, epoch: cancelling_stream(self._h.carry.remote(consumer, epoch, replica=replica)))

    def stream(self, req: GenerationRequest) -> AsyncIterator[Any]:
        return self._receiver.receive(req.request_id, self._control(req))

    async def consume(self, req: GenerationRequest, on_items: Callable[[list[Any]], bool]) -> None:
        """The request's items handed to `on_items` in the carrier's loop (`deployments.core.relay.Receiver.consume`)."""
        await self._receiver.consume(req.request_id, self._control(req), on_items)

    def _control(self, req: GenerationRequest) -> AsyncIterator[Any]:
        return cancelling_stream(self._method.remote(req, self._consumer))

    async def close(self) -> None:
        await self._receiver.close()


class PostprocessorHandleClient:
    """`deployments.openai.service.PostprocessorClient` over one version's postprocessor deployment."""

    def __init__(self, handle: DeploymentHandle, consumer: str):
        self._h = handle
        self._relay = RelayClient(handle, "stream", consumer)

    def stream(self, req: GenerationRequest) -> AsyncIterator[tuple[str, dict | None]]:
        return self._relay.stream(req)

    async def complete(self, req: GenerationRequest) -> dict:
        return await awaited(self._h.complete.remote(req))


class EmbedderHandleClient:
    """`deployments.openai.service.EmbedderClient` over one version's embedding deployment."""

    def __init__(self, handle: DeploymentHandle):
        self._h = handle

    async def embed(self, request_id: str, items: list[Any], billing: Any = None, dimensions: int | None = None) -> Any:
        return await awaited(self._h.embed.remote(request_id, items, billing, dimensions))


async def awaited(response: Any) -> Any:
    """A unary handle call's result; cancelling the wait cancels the call too (a client gone, a timeout, a sibling
    sub-request failed): awaiting is not the call."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise

