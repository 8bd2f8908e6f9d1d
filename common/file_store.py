"""Tenants' uploaded files (OpenAI's Files API, purpose `fine-tune`), in a folder every node can read.

`<root>/.files/t_<tenant>/<file id>/` holds `data.jsonl` and `file.json` (the record). The root is
the model store's by default, so a training job on any node reads an upload where the ingress wrote
it. A file is written to a hidden staging folder and renamed into place whole, so a reader never sees
part of one; deleting renames it away first. Every lookup is by tenant: another tenant's id is a 404,
the same answer as an id that never existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import NotFoundError

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
DATA_FILE = "data.jsonl"
RECORD_FILE = "file.json"


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    sha256: str
    examples: int

    def to_openai(self) -> dict:
        """OpenAI's File object."""
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at, "filename": self.filename,
            "purpose": self.purpose, "status": "processed", "status_details": None,
        }  # fmt: skip


class FileStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve() / ".files"

    def _tenant_dir(self, tenant: str) -> Path:
        if not tenant or "/" in tenant or "\0" in tenant:
            raise ValueError(f"invalid tenant name {tenant!r}")
        return self.root / f"t_{tenant}"  # a prefix keeps names such as `..` one plain folder

    def _dir(self, tenant: str, file_id: str) -> Path:
        if not FILE_ID.match(file_id or ""):
            raise NotFoundError(f"No such File object: {file_id}", param="file_id")
        return self._tenant_dir(tenant) / file_id

    def create(self, tenant: str, filename: str, purpose: str, data: bytes, examples: int, now: float | None = None) -> FileRecord:
        record = FileRecord(
            id=f"file-{uuid.uuid4().hex[:24]}", tenant=tenant, filename=filename, purpose=purpose, bytes=len(data),
            created_at=int(now if now is not None else time.time()), sha256=hashlib.sha256(data).hexdigest(), examples=examples,
        )  # fmt: skip
        parent = self._tenant_dir(tenant)
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".staging-{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            (staging / DATA_FILE).write_bytes(data)
            (staging / RECORD_FILE).write_text(json.dumps(asdict(record)))
            os.rename(staging, parent / record.id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord:
        path = self._dir(tenant, file_id) / RECORD_FILE
        try:
            return FileRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFoundError(f"No such File object: {file_id}", param="file_id") from None

    def data_path(self, tenant: str, file_id: str) -> Path:
        self.get(tenant, file_id)
        return self._dir(tenant, file_id) / DATA_FILE

    def list(self, tenant: str, purpose: str | None = None) -> list[FileRecord]:
        """The tenant's files, newest first."""
        parent = self._tenant_dir(tenant)
        found = []
        for entry in parent.iterdir() if parent.is_dir() else ():
            if FILE_ID.match(entry.name) and (entry / RECORD_FILE).is_file():
                rec = FileRecord(**json.loads((entry / RECORD_FILE).read_text()))
                if purpose is None or rec.purpose == purpose:
                    found.append(rec)
        return sorted(found, key=lambda r: (-r.created_at, r.id))

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = self.get(tenant, file_id)
        gone = self._tenant_dir(tenant) / f".deleted-{uuid.uuid4().hex}"
        os.rename(self._dir(tenant, file_id), gone)  # atomic: the id stops resolving at once
        shutil.rmtree(gone, ignore_errors=True)
        return record
