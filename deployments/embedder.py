"""Serve deployment of an embedding model over `deployments.core.embedder.Embedder`: one vLLM pooling engine per replica.

An embedding model's version application is this deployment under a router-free root
(`deployments.version_app`); the ingress calls `embed` with the request's inputs and billing
context, and the engine's count is billing's second witness, as the generator's is.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve

from common.config import EngineConfig
from deployments.core.embedder import Embedder, VLLMPoolingEngine
from deployments.core.embeddings import Embedded
from deployments.core.generator import engine_env_vars
from deployments.generator import engine_witness

logger = logging.getLogger(__name__)


@serve.deployment
class EmbeddingModel:
    async def __init__(self, model_path: str, engine_config: dict, billing: dict | None = None, model_name: str = "", version: str = ""):
        from common.logs import setup_logging

        setup_logging("embedder")
        config = EngineConfig.model_validate(engine_config)
        witness = engine_witness(billing)
        on_end = None
        if witness is not None:
            on_end = lambda request_id, context, tokens: witness.report(request_id, context, tokens, 0, True)  # noqa: E731
        os.environ.update(engine_env_vars(config, len(os.sched_getaffinity(0))))  # before vLLM is imported
        from transformers import AutoTokenizer

        self._engine = VLLMPoolingEngine(model_path, config)
        self._engine.start()
        self._logic = Embedder(AutoTokenizer.from_pretrained(model_path), self._engine, config.max_model_len, on_end=on_end)
        dims = await self._logic.warm_up()
        logger.info("embedding model %s %s ready: %d dimensions, %.1fs to load", model_name, version, dims, self._engine.startup_s or 0)

    async def embed(self, request_id: str, items: list[Any], billing: Any = None, dimensions: int | None = None) -> Embedded:
        return await self._logic.embed(request_id, items, billing, dimensions)

    async def info(self) -> dict:
        """What the ingress needs to check a request before sending it: the vectors' size and the context window."""
        return {"dimensions": self._logic.dimensions, "max_model_len": self._logic.max_model_len, "startup_s": self._engine.startup_s}

    async def stats(self) -> dict:
        return {"ready": self._engine.ready, "requests": self._logic.requests, "inputs": self._logic.inputs, "startup_s": self._engine.startup_s}

    async def check_health(self) -> None:
        if not self._engine.ready:
            raise RuntimeError("vLLM embedding engine is not running")

    def __del__(self) -> None:
        self._engine.shutdown()
