"""Tenants' uploaded files (OpenAI's Files API, purpose `fine-tune`), in a folder every node can read.

`<root>/.files/t_<digest of the tenant>/<file id>/` holds `data.jsonl` and `file.json` (the record). The
folder is named by a digest of the exact tenant name, so `Acme` and `acme` never share one, even on a
case-insensitive filesystem (folders of the older `t_<tenant>` layout are still read). The root is the
model store's by default, so a training job on any node reads an upload where the ingress wrote it. A
file is streamed to a hidden staging folder and renamed into place whole, so a reader never sees part
of one; deleting renames it away first. Every lookup is by tenant and checks the record's tenant too:
another tenant's id is a 404, the same answer as an id that never existed.
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
from typing import BinaryIO

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

    def _tenant_dirs(self, tenant: str) -> tuple[Path, Path]:
        """(the tenant's folder, the older layout's folder, read only)."""
        if not tenant or "/" in tenant or "\0" in tenant:
            raise ValueError(f"invalid tenant name {tenant!r}")
        return self.root / f"t_{hashlib.sha256(tenant.encode()).hexdigest()[:32]}", self.root / f"t_{tenant}"

    def _dir(self, tenant: str, file_id: str) -> Path:
        if not FILE_ID.match(file_id or ""):
            raise NotFoundError(f"No such File object: {file_id}", param="file_id")
        current, legacy = self._tenant_dirs(tenant)
        return legacy / file_id if not (current / file_id).exists() and (legacy / file_id).exists() else current / file_id

    def create(self, tenant: str, filename: str, purpose: str, data: bytes | BinaryIO, examples: int, now: float | None = None) -> FileRecord:
        """Keep `data` (bytes, or a binary file read from where it stands, in chunks) as a new file of the tenant."""
        parent = self._tenant_dirs(tenant)[0]
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".staging-{uuid.uuid4().hex}"
        digest, size = hashlib.sha256(), 0
        try:
            staging.mkdir()
            with open(staging / DATA_FILE, "wb") as out:
                if isinstance(data, bytes):
                    out.write(data)
                    digest.update(data)
                    size = len(data)
                else:
                    while chunk := data.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            record = FileRecord(
                id=f"file-{uuid.uuid4().hex[:24]}", tenant=tenant, filename=filename, purpose=purpose, bytes=size,
                created_at=int(now if now is not None else time.time()), sha256=digest.hexdigest(), examples=examples,
            )  # fmt: skip
            (staging / RECORD_FILE).write_text(json.dumps(asdict(record)))
            os.rename(staging, parent / record.id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord:
        path = self._dir(tenant, file_id) / RECORD_FILE
        try:
            record = FileRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            record = None
        if record is None or record.tenant != tenant:  # a folder shared by two names (an old layout on a case-insensitive disk)
            raise NotFoundError(f"No such File object: {file_id}", param="file_id")
        return record

    def data_path(self, tenant: str, file_id: str) -> Path:
        self.get(tenant, file_id)
        return self._dir(tenant, file_id) / DATA_FILE

    def list(self, tenant: str, purpose: str | None = None) -> list[FileRecord]:
        """The tenant's files, newest first."""
        found = {}
        for parent in self._tenant_dirs(tenant):
            for entry in parent.iterdir() if parent.is_dir() else ():
                if FILE_ID.match(entry.name) and entry.name not in found and (entry / RECORD_FILE).is_file():
                    rec = FileRecord(**json.loads((entry / RECORD_FILE).read_text()))
                    if rec.tenant == tenant and (purpose is None or rec.purpose == purpose):
                        found[rec.id] = rec
        return sorted(found.values(), key=lambda r: (-r.created_at, r.id))

    def usage(self, tenant: str) -> tuple[int, int]:
        """(files, bytes) the tenant keeps: what its plan's `max_files` and `max_file_storage_mib` bound."""
        records = self.list(tenant)
        return len(records), sum(r.bytes for r in records)

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = self.get(tenant, file_id)
        folder = self._dir(tenant, file_id)
        gone = folder.parent / f".deleted-{uuid.uuid4().hex}"
        os.rename(folder, gone)  # atomic: the id stops resolving at once
        shutil.rmtree(gone, ignore_errors=True)
        return record
