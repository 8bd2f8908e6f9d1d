"""The logic behind OpenAI's Files API (`/v1/files`): a tenant's fine-tuning datasets, checked whole before they are kept.

Files live in `common.file_store.FileStore` (the model store's root by default, which every node
reads). The store's calls touch the disk and run on a thread here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from common.datasets import DatasetError, check_upload
from common.errors import InvalidRequestError
from common.file_store import FileStore

PURPOSES = ("fine-tune",)
NO_TENANT = "local"  # the one owner of every file when billing (and with it tenants) is off


def tenant_of(principal: Any) -> str:
    return principal.tenant if principal is not None else NO_TENANT


class FilesService:
    def __init__(self, store: FileStore, run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread):
        self._store = store
        self._run = run_blocking

    async def create(self, principal: Any, filename: str, purpose: str, data: bytes) -> dict:
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"Unsupported purpose `{purpose}`; this server keeps files for {', '.join(PURPOSES)}.", param="purpose", code="invalid_purpose")
        if not data:
            raise InvalidRequestError("The file is empty.", param="file", code="invalid_file_format")
        try:
            stats = check_upload(data, filename)
        except DatasetError as exc:
            where = f"line {exc.line}: " if exc.line else ""
            raise InvalidRequestError(
                f"Invalid file format for fine-tuning ({where}{exc.reason}). Each line must be a JSON object "
                '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} with an assistant message.',
                param="file",
                code="invalid_file_format",
            ) from None
        record = await self._run(self._store.create, tenant_of(principal), filename[:256] or "upload.jsonl", purpose, data, stats.examples)
        return record.to_openai()

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
