"""Serve request router of the stages with a batched return path (generator, postprocessor).

A request is routed as Serve's default router does (power of two choices, locality,
multiplexing); a carrier call (`deployments.core.relay`) names the one replica it must
reach in its `replica` keyword and goes there. Built as Ray Serve LLM's own
`PrefixCacheAffinityRouter` is: the mixins, no FIFO mixin (a routing task then fulfils
exactly its own request, so a carrier is never handed another request's replica), and
Serve's power-of-two choice for everything else.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

PINNED_ROUTER = "deployments.routing:PinnedRouter"


class PinnedRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        pin = pending_request.kwargs.get("replica") if pending_request is not None else None
        if pin is None:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)  # type: ignore[arg-type]
        return [[r for r in candidate_replicas if r.replica_id.unique_id == pin]]
