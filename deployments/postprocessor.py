"""Serve deployment of the postprocessor stage over `deployments.core.postprocessor.ResponseWriter`.

Deployed only with `deployments.inline_postprocess: false`; by default the ingress does this work itself
(`deployments.core.postprocessor.InlinePostprocessor`).

It reads the generator's token deltas (batched per engine step, `deployments.core.relay`) and
turns them into OpenAI responses (detokenization, stop strings, shapes); streamed responses go
back to the ingress batched the same way.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from common.logs import setup_logging
from deployments.core.postprocessor import rust_writer
from deployments.core.relay import Batch, End, Hello, Sender
from deployments.core.tokenizer import load_hf_tokenizer
from deployments.core.types import GenerationRequest, SSEPiece, piece_usage
from deployments.handles import RelayClient

logger = logging.getLogger(__name__)


@serve.deployment
class Postprocessor:
    def __init__(self, generator: DeploymentHandle, model_path: str):
        setup_logging("postprocessor")
        self._logic = rust_writer(load_hf_tokenizer(model_path))
        me = serve.get_replica_context().replica_id.unique_id
        self._generator = RelayClient(generator, "generate", me)
        self._sender = Sender(me)

    async def stream(self, req: GenerationRequest, consumer: str) -> AsyncIterator[Hello | End]:
        """The request's control stream; its SSE pieces (`deployments.core.types.SSEPiece`) go to `consumer`'s carrier."""
        async for message in self._sender.serve(consumer, req.request_id, self._pieces(req, consumer)):
            yield message

    async def carry(self, consumer: str, epoch: int, replica: str = "") -> AsyncIterator[Batch]:
        """The carrier to one ingress replica (`replica` is this one's id; Serve routes with it)."""
        async for batch in self._sender.carry(consumer, epoch):
            yield batch

    async def _pieces(self, req: GenerationRequest, consumer: str) -> AsyncIterator[SSEPiece]:
        """The request's last pieces; the others go straight into `consumer`'s outbox from the carrier's loop.

        One wake per engine step for every request here: the carrier from the generator decodes and shapes
        each request of the step in turn and puts the piece in the ingress's outbox (plain calls), and the
        request's own task wakes only when it ends."""
        trace = {"postprocessor_called": time.time()}
        out = self._logic.streamed(req)
        usage = None
        put = self._sender.put

        def on_items(items: list) -> bool:
            for deltas in items:
                piece = out.feed(deltas)
                if piece is not None:
                    if "postprocessor_first_piece" not in trace:
                        trace["postprocessor_first_piece"] = time.time()
                    put(consumer, req.request_id, piece)
                if out.done:
                    return out.cut  # a stop string: cancel the engine request; else its End is on the way
            return False

        try:
            await self._generator.consume(req, on_items)
            for piece in out.end():
                usage = piece_usage(piece) or usage
                yield piece
        finally:
            _log_end(req, usage, trace)

    async def complete(self, req: GenerationRequest) -> dict:
        out = self._logic.whole(req)
        usage = None

        def on_items(items: list) -> bool:
            for deltas in items:
                out.feed(deltas)
                if out.done:
                    return out.cut
            return False

        try:
            await self._generator.consume(req, on_items)
            result = out.end()
            usage = result["usage"]
            return result
        finally:
            _log_end(req, usage)

    async def stats(self) -> dict:
        """What this replica's carriers to the ingress sent (`deployments.core.relay.Sender.stats`)."""
        return {"relay": self._sender.stats()}

    async def __del__(self) -> None:
        await self._generator.close()


def _log_end(req: GenerationRequest, usage: dict | None, trace: dict | None = None) -> None:
    logger.info(
        "response %s", "finished" if usage else "ended early",
        extra={"request_id": req.request_id, "version": req.model_version, "stream": req.stream, "completion_tokens": usage["completion_tokens"] if usage else None, "trace": trace},
    )
