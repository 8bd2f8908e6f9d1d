"""The billing actor: a named, detached Ray actor around `BillingCore`, and how replicas and tools reach it.

It restarts on failure (`max_restarts=-1`) and rebuilds its aggregates from the
ledger; callers resend what was not acknowledged.  It is pinned to the head node
because the embedded SQLite ledger is a file there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from billing.catalog import BillingConfig
from billing.ledger import Ledger
from billing.metrics import RayBillingMetrics
from billing.records import EngineCount, SyncReply, SyncRequest, UsageEvent
from billing.service import BillingCore

logger = logging.getLogger(__name__)


class BillingActor:
    def __init__(self, config: dict):
        from cluster.logs import setup_logging

        setup_logging("billing")
        cfg = BillingConfig.model_validate(config)
        self._core = BillingCore(cfg, Ledger(cfg.resolved_ledger_url()), RayBillingMetrics())

    def sync(self, req: SyncRequest) -> SyncReply:
        return self._core.sync(req)

    def record(self, events: list[UsageEvent]) -> int:
        return self._core.record(events)

    def engine_counts(self, counts: list[EngineCount]) -> int:
        return self._core.engine_counts(counts)

    def configure(self, config: dict, who: str = "system") -> bool:
        return self._core.configure(BillingConfig.model_validate(config), who)

    def status(self) -> dict:
        return {**self._core.status(), "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Administration and reports: any public method of `BillingCore` (keys, plans, usage, totals, audit)."""
        if method.startswith("_") or not hasattr(self._core, method):
            raise AttributeError(f"BillingCore has no method {method!r}")
        return getattr(self._core, method)(*args, **kwargs)


def get_or_create(config: BillingConfig) -> Any:
    """The billing actor's handle, creating it (detached, restartable, on the head node) if it does not exist."""
    return (
        ray.remote(BillingActor)
        .options(
            name=config.actor_name,
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,  # callers resend themselves; the ledger is idempotent
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote(config.model_dump(mode="json"))
    )


def get(config: BillingConfig) -> Any:
    return ray.get_actor(config.actor_name, namespace=config.namespace)


class ActorTransport:
    """`billing.client.Transport` over the actor handle.

    A call to a restarting actor waits until it is back; the timeout bounds that, and
    whatever was not acknowledged is simply sent again (the ledger is idempotent).
    """

    def __init__(self, handle: Any, timeout_s: float = 10.0):
        self._h = handle
        self._timeout_s = timeout_s

    async def sync(self, req: SyncRequest) -> SyncReply:
        return await asyncio.wait_for(asyncio.wrap_future(self._h.sync.remote(req).future()), self._timeout_s)
