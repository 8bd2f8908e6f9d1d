"""Tenants' fine-tuned models served as LoRA adapters on the running base: which exist, and whose they are.

A finished fine-tuning job publishes its adapter in the model store as the model
`ft:<base>:<tenant>:<suffix>:<job short id>` with `tenant` and the `adapter` base (name, version) in its
metadata. The catalog reads the store (cached for `ttl_s`; a miss re-reads it at once, so a model that
just finished is found) and answers per tenant: another tenant's model is the same 404 as one that does
not exist. No Ray here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from common.errors import ModelNotFoundError
from common.model_store import open_store

PREFIX = "ft:"


def adapters_wanted(enable_lora: bool | str, store_root: str, base_model: str) -> bool:
    """Whether an engine for `base_model` starts with LoRA support: `engine.enable_lora` resolved, `auto` meaning
    "once the store holds a tenant adapter of this base" (LoRA costs throughput while no adapter uses it)."""
    if enable_lora != "auto":
        return bool(enable_lora)
    return bool(AdapterCatalog(store_root, base_model).all())


def fine_tuned_model_id(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape: `ft:<base>:<tenant>:<suffix>:<job short id>` (an empty suffix leaves `::`)."""
    return f"{PREFIX}{base}:{tenant}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


@dataclass(frozen=True)
class Adapter:
    model: str  # the ft: id clients call
    version: str  # its store version
    path: str  # the adapter folder (adapter_config.json, adapter_model.safetensors)
    tenant: str
    base: str
    base_version: str
    created: int


class AdapterCatalog:
    def __init__(self, store_root: str, base_model: str, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self._root = store_root
        self._base = base_model
        self._ttl = ttl_s
        self._clock = clock
        self._at = -float("inf")
        self._by_id: dict[str, Adapter] = {}

    def _scan(self) -> None:
        store = open_store(self._root)
        found = {}
        for name in store.models():
            if not name.startswith(f"{PREFIX}{self._base}:"):
                continue
            mv = store.versions(name)[-1]
            base = (mv.metadata.get("adapter") or {}).get("base") or {}
            tenant = mv.metadata.get("tenant")
            if not tenant or base.get("name") != self._base:
                continue
            created = mv.metadata.get("created_unix") or int(mv.path.stat().st_mtime)
            found[name] = Adapter(name, mv.version, str(mv.path), tenant, self._base, base.get("version", ""), int(created))
        self._by_id, self._at = found, self._clock()

    def _fresh(self, force: bool = False) -> dict[str, Adapter]:
        if force or self._clock() - self._at > self._ttl:
            self._scan()
        return self._by_id

    def all(self) -> list[Adapter]:
        return sorted(self._fresh().values(), key=lambda a: a.model)

    def for_tenant(self, tenant: str) -> list[Adapter]:
        return sorted((a for a in self._fresh().values() if a.tenant == tenant), key=lambda a: a.model)

    def resolve(self, model: str, tenant: str) -> Adapter:
        adapter = self._fresh().get(model)
        if adapter is None and self._clock() - self._at > 0.2:  # perhaps just published: look again (at most every 0.2 s)
            adapter = self._fresh(force=True).get(model)
        if adapter is None or adapter.tenant != tenant:
            raise ModelNotFoundError(f"The model `{model}` does not exist or you do not have access to it.", param="model", code="model_not_found")
        return adapter
