"""The logic behind OpenAI's Batch API (`/v1/batches`) at the ingress: the caller's tenant and key, then the batch actor.

The batch actor (`deployments.batches`, over `deployments.core.batches.BatchManager`) keeps the batches and
runs them; this service only says who asks. A tenant sees and cancels its own batches, never another's
(another tenant's id is a 404, as an id that never existed).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from deployments.openai.files import tenant_of
from deployments.openai.protocol import CreateBatchRequest

Invoke = Callable[..., Awaitable[Any]]  # (manager method, *args): the actor's method, awaited


class BatchesService:
    def __init__(self, invoke: Invoke):
        self._invoke = invoke

    async def create(self, principal: Any, body: CreateBatchRequest) -> dict:
        key_id = getattr(principal, "key_id", "") or ""
        return await self._invoke("create", tenant_of(principal), key_id, body.input_file_id, body.endpoint, body.completion_window, body.metadata)

    async def get(self, principal: Any, batch_id: str) -> dict:
        return await self._invoke("get", tenant_of(principal), batch_id)

    async def list(self, principal: Any, after: str | None, limit: int) -> dict:
        return await self._invoke("list", tenant_of(principal), after, limit)

    async def cancel(self, principal: Any, batch_id: str) -> dict:
        return await self._invoke("cancel", tenant_of(principal), batch_id)
