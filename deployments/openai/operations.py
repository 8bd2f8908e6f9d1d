"""The logic behind the operators' `/admin/traffic` and `/admin/health`: the live traffic plan, its changes, and Serve's health.

It reaches the cluster through a `Fleet` (Ray's is `deployments.fleet.ServeFleet`, whose calls
block on Serve's controller and are run on a thread here); unit tests pass a fake.  A change
returns once the new plan is live; retiring the versions it no longer needs (after every ingress
replica has followed it) goes on in the background, as `maas models canary` does it in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Protocol

from common.errors import InvalidRequestError
from deployments.openai.protocol import TrafficChange

logger = logging.getLogger(__name__)


class Fleet(Protocol):
    def plan(self) -> dict | None: ...

    def versions(self) -> list[dict]: ...

    def change(self, action: str, version: str | None, weight: int | None, who: str) -> dict: ...

    def settle(self) -> list[str]: ...

    def health(self) -> dict: ...


RunBlocking = Callable[..., Awaitable[Any]]


class OperationsService:
    def __init__(self, fleet: Fleet, model: str, run_blocking: RunBlocking = asyncio.to_thread):
        self._fleet = fleet
        self._model = model
        self._run = run_blocking
        self._changing = asyncio.Lock()  # one change at a time from this replica (the plan file's lock covers the others)
        self._settling: set[asyncio.Task] = set()

    async def traffic(self) -> dict:
        """The live plan (weights, deployed versions, who changed it last) and the store's versions of the model."""
        plan, versions = await self._run(self._fleet.plan), await self._run(self._fleet.versions)
        return {"object": "traffic", "model": self._model, "plan": plan, "versions": versions}

    async def change(self, principal: Any, body: TrafficChange) -> dict:
        if body.action != "canary" and body.weight is not None:
            raise InvalidRequestError("`weight` applies to a canary only.", param="weight")
        who = f"console:{principal.key_id}" if principal is not None else "console"
        async with self._changing:
            plan = await self._run(self._fleet.change, body.action, body.version, body.weight, who)
        task = asyncio.get_running_loop().create_task(self._settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return {"object": "traffic", "model": self._model, "plan": plan}

    async def _settle(self) -> None:
        try:
            retired = await self._run(self._fleet.settle)
            if retired:
                logger.info("retired %s", ", ".join(retired))
        except Exception:  # the next change or deploy retires what is left
            logger.exception("could not retire the versions the traffic plan no longer needs")

    async def health(self) -> dict:
        return {"object": "health", **await self._run(self._fleet.health)}
