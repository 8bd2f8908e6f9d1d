"""The named batch actor: `deployments.core.batches.BatchManager` on Ray, feeding batch lines to the ingress through a Serve handle.

Detached, restartable, on the head node, holding no CPU. The manager runs on one event loop of its
own (a thread): its ticks, its batches' lines and the API's calls, which the actor's threads hand to
that loop, so its state is only ever touched from there. A restarted actor finds every unfinished
batch in the store and resumes it where its results end (`BatchManager`'s exactly-once rule).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Coroutine

import ray

from common.actors import invoker
from common.config import MaasConfig, Price
from common.logs import setup_logging
from deployments.core.batches import BatchManager

logger = logging.getLogger(__name__)


class IngressLines:
    """`LineRunner` over the front application's ingress deployment: each line admitted, metered and billed there."""

    def __init__(self, app_name: str):
        self._app_name = app_name
        self._handle: Any = None

    async def run(self, tenant: str, key_id: str, url: str, body: dict, request_id: str) -> tuple[int, dict]:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Ingress", app_name=self._app_name)
        return await self._handle.batch_line.remote(key_id, url, body, request_id)


def batch_price(config: MaasConfig) -> Any:
    """A line's price per token at the batch tier: the model's (a fine-tune's `ft:<base>:` price for one of those)."""
    book = config.billing.price_book

    def price_of(model: str) -> Price:
        if not config.billing.enabled:
            return Price(prompt_per_1m=0, completion_per_1m=0)
        price = book.fine_tuned_price(model.split(":")[1]) if model.startswith("ft:") and model.count(":") >= 2 else book.price_for(model)
        return book.for_tier(price, "batch")

    return price_of


def context_window(config: MaasConfig) -> Any:
    def window_of(model: str) -> int:
        base = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else model
        try:
            return config.for_model(base).engine.max_model_len
        except KeyError:  # not served here: the line's request gets its 404; bound it by the main window meanwhile
            return config.engine.max_model_len

    return window_of


class BatchActor:
    """The manager's public methods, run on its own loop; a tick every `batches.poll_s` starts and resumes batches."""

    def __init__(self, config: dict):
        setup_logging("batches")
        cfg = MaasConfig.model_validate(config)
        self._poll_s = cfg.batches.poll_s
        billing = None
        if cfg.billing.enabled:
            from billing import actor

            billing = actor.admin_client(actor.get_or_create(cfg.billing))
        self._manager = BatchManager(
            cfg.store_root(), IngressLines(cfg.app_name), billing, batch_price(cfg), context_window(cfg), cfg.batches.max_in_flight, retry_s=cfg.batches.retry_s
        )
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="batches", daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._ticks(), self._loop)

    async def _ticks(self) -> None:
        while True:
            try:
                await self._manager.tick()
            except Exception:
                logger.exception("batch tick failed; retrying")
            await asyncio.sleep(self._poll_s)

    def _on_loop(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def create(self, *args: Any) -> dict:
        return self._on_loop(self._manager.create(*args))

    def cancel(self, tenant: str | None, batch_id: str) -> dict:
        return self._on_loop(self._manager.cancel(tenant, batch_id))

    def get(self, tenant: str | None, batch_id: str) -> dict:
        return self._manager.get(tenant, batch_id)

    def list(self, tenant: str | None, after: str | None = None, limit: int = 20) -> dict:
        return self._manager.list(tenant, after, limit)


def get_or_create(config: MaasConfig) -> Any:
    return (
        ray.remote(BatchActor)
        .options(
            name=config.batches.actor_name,
            namespace=config.billing.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=8,  # the API's calls, each handed to the manager's loop
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote(config.model_dump(mode="json"))
    )


READS = ("get", "list")  # calls that may be sent again: they change nothing


def client(handle: Any, timeout_s: float = 120.0, restart_wait_s: float = 30.0) -> Any:
    """The ingress's `Invoke` for `deployments.openai.batches.BatchesService`: each call on the actor, awaited.

    While the actor restarts, a read waits for it up to `restart_wait_s`; a change (create, cancel) is a 503 with
    Retry-After: never a 500, never done twice (`common.actors.invoker`)."""
    return invoker(handle, "batch", READS, timeout_s, restart_wait_s)
