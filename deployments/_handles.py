"""Small adapters between Serve handle streams and the plain async interfaces the logic expects."""

from __future__ import annotations

from typing import Any, AsyncIterator


async def cancelling_stream(response_gen: Any) -> AsyncIterator[Any]:
    """Iterate a Serve streaming response; cancel the remote call if we stop early or are cancelled.

    Cancelling the handle call cancels the callee's generator, which (for the
    generator stage) aborts the vLLM request and frees its batch slot.
    """
    finished = False
    try:
        async for item in response_gen:
            yield item
        finished = True
    finally:
        if not finished:
            response_gen.cancel()
