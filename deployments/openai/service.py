"""The ingress's logic: validate the model, prepare the prompt, and drive the postprocessor.

It talks to the other stages through two small interfaces, so the Serve wrapper
plugs in deployment handles and unit tests plug in in-process fakes.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable, Protocol

from deployments.core.errors import EngineNotReadyError, ModelNotFoundError
from deployments.core.types import GenerationRequest, TokenizedPrompt
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest

SSEStream = AsyncIterator[tuple[str, "dict | None"]]


class TokenizerClient(Protocol):
    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None) -> TokenizedPrompt: ...

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt: ...


class PostprocessorClient(Protocol):
    def stream(self, req: GenerationRequest) -> SSEStream: ...

    async def complete(self, req: GenerationRequest) -> dict: ...


class OpenAIService:
    """Chat and text completions over the tokenizer and postprocessor stages."""

    def __init__(
        self,
        model_name: str,
        tokenizer: TokenizerClient,
        postprocessor: PostprocessorClient,
        is_ready: Callable[[], bool] = lambda: True,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ):
        self.model_name = model_name
        self._tokenizer = tokenizer
        self._post = postprocessor
        self._is_ready = is_ready
        self._new_request_id = new_request_id
        self._created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self._created, "owned_by": "ray-maas"}]}

    def ready(self) -> bool:
        return self._is_ready()

    async def chat(self, body: ChatCompletionRequest) -> dict | SSEStream:
        self._admit(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await self._tokenizer.prepare_chat(messages, body.token_limit)
        return await self._run(self._request("chat", body, prompt))

    async def completion(self, body: CompletionRequest) -> dict | SSEStream:
        self._admit(body.model)
        prompt = await self._tokenizer.prepare_completion(body.prompt, body.token_limit)  # type: ignore[arg-type]
        return await self._run(self._request("completion", body, prompt))

    def _admit(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFoundError(f"The model `{model}` does not exist. Available: {self.model_name}.", param="model")
        if not self._is_ready():
            raise EngineNotReadyError()

    def _request(self, kind: str, body: ChatCompletionRequest | CompletionRequest, prompt: TokenizedPrompt) -> GenerationRequest:
        return GenerationRequest(
            request_id=self._new_request_id(),
            model=self.model_name,
            kind=kind,  # type: ignore[arg-type]
            prompt_token_ids=prompt.prompt_token_ids,
            max_tokens=prompt.max_tokens,
            created=int(time.time()),
            n=body.n,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=body.stop_list,
            stop_token_ids=prompt.stop_token_ids,
            ignore_eos=body.ignore_eos,
            stream=body.stream,
            include_usage=body.include_usage,
        )

    async def _run(self, req: GenerationRequest) -> dict | SSEStream:
        if not req.stream:
            return await self._post.complete(req)
        stream = self._post.stream(req)
        # Wait for the first piece so that errors before any token still get a proper HTTP status.
        first = await stream.__anext__()
        return _prepend(first, stream)


async def _prepend(first: tuple[str, dict | None], rest: SSEStream) -> SSEStream:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        # Close the upstream stream now (not at garbage collection) so a client that
        # went away cancels the postprocessor and generator at once.
        await rest.aclose()  # type: ignore[attr-defined]
