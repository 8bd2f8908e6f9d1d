"""Serve deployment of the generator stage over `deployments.core.generator.VLLMGenerator`: one vLLM engine per replica.

Serve routes each request here; its token deltas go back on one carrier per consumer replica (the
ingress, or the postprocessor stage when deployed), batched per engine step (`deployments.core.relay`).

The engine is built in the replica's constructor, so Serve routes to a replica
only once its engine is loaded; a failed engine fails the health check and Serve
replaces the replica.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, AsyncIterator

from ray import serve

from common.config import BillingConfig, EngineConfig
from deployments.core.generator import VLLMGenerator, coalesced, engine_env_vars
from deployments.core.relay import Batch, End, Hello, Sender
from deployments.core.types import GenerationRequest

logger = logging.getLogger(__name__)


def engine_witness(billing: dict | None) -> Any:
    """Billing's second witness (`billing.client.EngineWitness`) when billing is on: every request's engine count,
    so no usage dies with the ingress that admitted it. None when billing is off."""
    config = BillingConfig.model_validate(billing or {"enabled": False})
    if not config.enabled:
        return None
    from billing import actor
    from billing.client import EngineWitness

    handle = actor.get_or_create(config)
    return EngineWitness(lambda batch: handle.engine_usage.remote(batch), config.flush_interval_s)


@serve.deployment
class Generator:
    def __init__(self, model_path: str, engine_config: dict, billing: dict | None = None, model_name: str = "", version: str = ""):
        from common.logs import setup_logging
        from deployments.observability import RayQueueMetrics

        setup_logging("generator")
        config = EngineConfig.model_validate(engine_config)
        self._witness = engine_witness(billing)
        on_end = self._report if self._witness is not None else None
        if config.simulate_steps_per_s:  # capacity tests: the graph at an accelerator's pace, no model
            from deployments.core.paced import PacedEngine

            self._logic = PacedEngine(config.simulate_steps_per_s, config.max_num_seqs, on_end=on_end)
        else:
            # Fixed before vLLM is imported; the engine's worker process inherits it.
            os.environ.update(engine_env_vars(config, len(os.sched_getaffinity(0))))
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger  # vLLM's engine metrics, exported through Ray

            self._logic = VLLMGenerator(
                model_path,
                config,
                on_end=on_end,
                on_queue_wait=RayQueueMetrics(model_name or os.path.basename(model_path), version).observe,
                stat_loggers=[RayPrometheusStatLogger],
            )
        if config.scheduling.policy == "priority":  # requests enter the engine by tier, fair share and age
            from deployments.core.scheduling import ScheduledEngine

            self._logic = ScheduledEngine(self._logic, config.max_num_seqs, config.scheduling)
        self._logic.start()
        self._sender = Sender(serve.get_replica_context().replica_id.unique_id)

    def _report(self, req: GenerationRequest, produced: int, finished: bool, cached: int = 0) -> None:
        self._witness.report(req.request_id, req.billing, len(req.prompt_token_ids), produced, finished, cached)  # type: ignore[union-attr]

    async def generate(self, req: GenerationRequest, consumer: str) -> AsyncIterator[Hello | End]:
        """The request's control stream; its token deltas go to `consumer`'s carrier, one message per engine step (a request
        wanted whole, all at its end: `coalesced`)."""
        async for message in self._sender.serve(consumer, req.request_id, coalesced(req, self._logic.generate(req))):
            yield message

    async def carry(self, consumer: str, epoch: int, replica: str = "") -> AsyncIterator[Batch]:
        """The carrier to one consumer replica (`replica` is this one's id; Serve's router uses it)."""
        async for batch in self._sender.carry(consumer, epoch):
            yield batch

    async def ready(self) -> bool:
        return self._logic.ready

    async def stats(self) -> dict:
        return {**dataclasses.asdict(self._logic.stats()), "relay": self._sender.stats()}

    async def check_health(self) -> None:
        if not self._logic.ready:
            raise RuntimeError("vLLM engine is not running")

    def __del__(self) -> None:
        self._logic.shutdown()
