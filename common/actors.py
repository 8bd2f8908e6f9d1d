"""Calling a method on one of ray-maas's restartable named actors (billing, batches, fine-tuning) from async code.

Each actor is detached with `max_restarts=-1`: when it dies, Ray brings it back, and for those seconds a
call fails with `RayActorError` (the actor is restarting, or was found dead before the restart began). A
read changes nothing, so it is simply sent again until the actor answers or `restart_wait_s` runs out; a
change may or may not have been carried out, so it is never resent here: the caller gets a
`ServiceUnavailableError` (a 503 with Retry-After through the ingress), never a traceback.

Ray is imported inside the call, so this module costs nothing to import where Ray is absent.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Collection

Invoke = Callable[..., Awaitable[Any]]


def invoker(handle: Any, what: str, reads: Collection[str], timeout_s: float = 60.0, restart_wait_s: float = 30.0) -> Invoke:
    """`invoke(method, *args)` awaiting `handle.method.remote(*args)` on the caller's loop, bounded by `timeout_s`.

    `what` names the service in the 503's message ("The billing service is restarting"); `reads` are the
    methods that may be sent again."""

    async def invoke(method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        from common.errors import ServiceUnavailableError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + restart_wait_s
        while True:
            try:
                return await asyncio.wait_for(asyncio.wrap_future(getattr(handle, method).remote(*args).future()), timeout_s)
            except RayActorError as exc:
                if method not in reads or loop.time() > deadline:
                    raise ServiceUnavailableError(f"The {what} service is restarting; retry shortly.", headers={"Retry-After": "2"}) from exc
                await asyncio.sleep(0.5)

    return invoke
