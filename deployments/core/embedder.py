"""The embedder's logic: one vLLM engine with the pooling runner, inputs tokenized here, vectors out.

An embedding request is short and answered whole, so the embedding model runs as one stage (no
postprocessor): `Embedder.embed` tokenizes the inputs with the model's own tokenizer (special
tokens included), sends each to the engine as its own request, and returns the vectors with the
tokens embedded. The engine applies the model's pooling and normalization (for a
sentence-transformers folder, read from its `modules.json` and `1_Pooling/config.json`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from common.config import EngineConfig
from common.errors import EngineNotReadyError
from deployments.core.embeddings import Embedded, TextTokenizer, check_dimensions, tokenize
from deployments.core.generator import client_error, engine_args

logger = logging.getLogger(__name__)


class PoolingEngine(Protocol):
    """What the embedder needs of an engine: one vector per token-id list (vLLM's AsyncLLM.encode, or a fake)."""

    def encode(self, token_ids: list[int], request_id: str) -> AsyncIterator[Sequence[float]]: ...


class Embedder:
    """Tokenizes, embeds and counts; `on_end(request_id, billing context, prompt_tokens)` is billing's engine witness."""

    def __init__(self, tokenizer: TextTokenizer, engine: PoolingEngine, max_model_len: int, dimensions: int = 0, on_end: Callable[[str, Any, int], None] | None = None):
        self._tokenizer = tokenizer
        self._engine = engine
        self.max_model_len = max_model_len
        self.dimensions = dimensions
        self._on_end = on_end
        self.requests = 0
        self.inputs = 0

    async def embed(self, request_id: str, items: Sequence[str | list[int]], billing: Any = None, dimensions: int | None = None) -> Embedded:
        """A vector per input, in order; a 400 for an input the model cannot take or a `dimensions` it cannot give
        (before anything is embedded). `billing`: the request's billing context, which the witness reports with."""
        if self.dimensions:
            check_dimensions(dimensions, self.dimensions)
        token_lists = tokenize(items, self._tokenizer, self.max_model_len)
        vectors = await asyncio.gather(*(self._one(f"{request_id}-{i}", ids) for i, ids in enumerate(token_lists)))
        tokens = sum(len(ids) for ids in token_lists)
        self.requests += 1
        self.inputs += len(token_lists)
        if self._on_end is not None:
            self._on_end(request_id, billing, tokens)
        return Embedded([list(v) for v in vectors], tokens)

    async def warm_up(self) -> int:
        """Embeds one short text (the engine's first request compiles and allocates) and learns the vectors' size."""
        embedded = await self.embed("warm-up", ["warm up"])
        self.requests = self.inputs = 0
        self.dimensions = len(embedded.vectors[0])
        return self.dimensions

    async def _one(self, request_id: str, token_ids: list[int]) -> Sequence[float]:
        last = None
        try:
            async for out in self._engine.encode(token_ids, request_id):
                last = out
        except Exception as exc:
            raise client_error(exc) or exc
        if last is None:
            raise RuntimeError("The engine returned no embedding.")
        return last


class VLLMPoolingEngine:
    """vLLM's AsyncLLM with the pooling runner (`runner="pooling"`), fed token ids."""

    def __init__(self, model_path: str, config: EngineConfig):
        self._model_path = model_path
        self._config = config
        self._engine: Any = None
        self.startup_s: float | None = None

    def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        args = {**engine_args(self._model_path, self._config), "runner": "pooling", "skip_tokenizer_init": False}
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.startup_s = time.monotonic() - t0
        logger.info("embedding engine for %s ready in %.1fs", self._model_path, self.startup_s)

    @property
    def ready(self) -> bool:
        return self._engine is not None

    async def encode(self, token_ids: list[int], request_id: str) -> AsyncIterator[Sequence[float]]:
        if self._engine is None:
            raise EngineNotReadyError()
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        async for out in self._engine.encode(TokensPrompt(prompt_token_ids=token_ids), PoolingParams(task="embed"), request_id):
            yield out.outputs.data.tolist()

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
