"""The logic behind OpenAI's Files API (`/v1/files`): a tenant's fine-tuning datasets and batch inputs, checked whole before they are kept.

Batches' results are files too (`purpose=batch_output`), written by the batch actor, never uploaded.

Files live in `common.file_store.FileStore` (the model store's root by default, which every node
reads). An upload arrives spooled to a temporary file by the multipart parser; it is checked line by
line and copied into the store on a thread, never held whole in memory nor on the event loop. The
tenant's plan bounds its files: how many (`max_files`) and their bytes together (`max_file_storage_mib`).
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Any, Awaitable, BinaryIO, Callable

from common.config import Plan
from common.datasets import DatasetError, check_upload
from common.errors import InvalidRequestError, PermissionDeniedError
from common.file_store import FileStore
from deployments.core.batches import check_batch_upload

# What an upload may be for: how each is checked (returning its count of examples or requests), and what to say when not.
CHECKS: dict[str, tuple[Callable[[BinaryIO, str], int], str, str]] = {
    "fine-tune": (
        lambda source, name: check_upload(source, name).examples,
        "Invalid file format for fine-tuning",
        '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} with an assistant message',
    ),
    "batch": (check_batch_upload, "Invalid batch file", '{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}'),
}
PURPOSES = tuple(CHECKS)
NO_TENANT = "local"  # the one owner of every file when billing (and with it tenants) is off


def tenant_of(principal: Any) -> str:
    return principal.tenant if principal is not None else NO_TENANT


async def default_plan(tenant: str) -> Plan:
    """The limits when billing (and with it plans) is off: a plan's defaults."""
    return Plan()


class FilesService:
    def __init__(self, store: FileStore, run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread, plan_of: Callable[[str], Awaitable[Plan]] = default_plan):
        """`plan_of`: the tenant's plan (the billing actor's), whose limits bound its files."""
        self._store = store
        self._run = run_blocking
        self._plan_of = plan_of

    async def create(self, principal: Any, filename: str, purpose: str, data: bytes | BinaryIO) -> dict:
        """Keep an upload (bytes, or the spooled file the multipart parser wrote) once it is checked whole."""
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"Unsupported purpose `{purpose}`; this server keeps files for {', '.join(PURPOSES)}.", param="purpose", code="invalid_purpose")
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        tenant = tenant_of(principal)
        plan = await self._plan_of(tenant)
        return await self._run(self._keep, tenant, filename[:256] or "upload.jsonl", purpose, source, plan)

    def _keep(self, tenant: str, filename: str, purpose: str, source: BinaryIO, plan: Plan) -> dict:
        """On a thread: the plan's bounds, the dataset checked line by line, then copied into the store."""
        size = source.seek(0, os.SEEK_END)
        source.seek(0)
        if not size:
            raise InvalidRequestError("The file is empty.", param="file", code="invalid_file_format")
        count, used = self._store.usage(tenant)
        if plan.max_files is not None and count >= plan.max_files:
            raise PermissionDeniedError(f"Your plan keeps at most {plan.max_files} files; delete one first.", param="file", code="file_limit_reached")
        if plan.max_file_storage_mib is not None and used + size > plan.max_file_storage_mib * 2**20:
            raise PermissionDeniedError(
                f"Your plan keeps at most {plan.max_file_storage_mib:g} MiB of files; {used / 2**20:.1f} MiB are used and this file is {size / 2**20:.1f} MiB.",
                param="file", code="storage_limit_reached",
            )  # fmt: skip
        check, what, shape = CHECKS[purpose]
        try:
            count = check(source, filename)
        except DatasetError as exc:
            where = f"line {exc.line}: " if exc.line else ""
            raise InvalidRequestError(f"{what} ({where}{exc.reason}). Each line must be a JSON object {shape}.", param="file", code="invalid_file_format") from None
        source.seek(0)
        return self._store.create(tenant, filename, purpose, source, count).to_openai()

    async def list(self, principal: Any, purpose: str | None) -> dict:
        records = await self._run(self._store.list, tenant_of(principal), purpose)
        return {"object": "list", "data": [r.to_openai() for r in records], "has_more": False}

    async def get(self, principal: Any, file_id: str) -> dict:
        return (await self._run(self._store.get, tenant_of(principal), file_id)).to_openai()

    async def content(self, principal: Any, file_id: str) -> bytes:
        path = await self._run(self._store.data_path, tenant_of(principal), file_id)
        return await self._run(path.read_bytes)

    async def delete(self, principal: Any, file_id: str) -> dict:
        record = await self._run(self._store.delete, tenant_of(principal), file_id)
        return {"id": record.id, "object": "file", "deleted": True}
