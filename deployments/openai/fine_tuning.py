"""The logic behind OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`): check a job, then hand it to the fine-tuning actor.

Everything is checked here before anything is created: the base model (any chat model served), the method
(full fine-tunes are for admin keys), the adapter's rank against the engine's, the training and
validation files (the caller's own: another tenant's is the same 400 as a missing one), and that the
price book offers training. The actor (`deployments.fine_tunes`) holds the worst-case cost against the
budget when it takes the job, or refuses it. Reads of another tenant's job are 404s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from common.config import MaasConfig
from common.datasets import check_upload
from common.errors import EngineNotReadyError, InvalidRequestError, MaasError, ModelNotFoundError, PermissionDeniedError
from common.file_store import FileStore
from deployments.core.adapters import fine_tuned_model_id
from deployments.core.fine_tune_manager import new_job_id
from deployments.core.fine_tunes import Job, estimate_tokens
from deployments.openai.files import tenant_of
from deployments.openai.protocol import CreateFineTuningJobRequest, FineTuneHyperparameters
from deployments.openai.service import require_allowed

Invoke = Callable[..., Awaitable[Any]]


class FineTuneBackend:
    """The fine-tuning actor's calls (`deployments.core.fine_tune_manager.FineTuneManager`), awaited."""

    def __init__(self, invoke: Invoke):
        self._invoke = invoke

    @classmethod
    def in_process(cls, manager: Any) -> "FineTuneBackend":
        async def invoke(method: str, *args: Any) -> Any:
            return await asyncio.to_thread(getattr(manager, method), *args)

        return cls(invoke)

    async def create(self, job: Job) -> dict:
        return await self._invoke("create", job)

    async def get(self, tenant: str | None, job_id: str) -> dict:
        return await self._invoke("get", tenant, job_id)

    async def list(self, tenant: str | None, after: str | None, limit: int) -> dict:
        return await self._invoke("list", tenant, after, limit)

    async def events(self, tenant: str | None, job_id: str, after: str | None, limit: int) -> dict:
        return await self._invoke("events", tenant, job_id, after, limit)

    async def checkpoints(self, tenant: str | None, job_id: str, limit: int) -> dict:
        return await self._invoke("checkpoints", tenant, job_id, limit)

    async def cancel(self, tenant: str | None, job_id: str) -> dict:
        return await self._invoke("cancel", tenant, job_id)


class FineTuningService:
    def __init__(
        self,
        backend: FineTuneBackend,
        config: MaasConfig,
        stable_version: Callable[[str], str | None],
        run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        clock: Callable[[], float] = time.time,
    ):
        self._backend = backend
        self._cfg = config
        self._files = FileStore(config.store_root())
        self._stable = stable_version
        self._run = run_blocking
        self._clock = clock

    async def create(self, principal: Any, body: CreateFineTuningJobRequest) -> dict:
        ft = self._cfg.fine_tuning
        tenant = tenant_of(principal)
        chat = [view.model.name for view in self._cfg.served() if view.model.task == "chat"]
        if body.model not in chat:
            raise ModelNotFoundError(f"The model `{body.model}` cannot be fine-tuned here; fine-tune one of {', '.join(chat)}.", param="model")
        cfg = self._cfg.for_model(body.model)  # the chat model's own engine (LoRA rank) and price
        require_allowed(principal, body.model)  # the key's own budget is held too, by the actor (`BillingCore.hold`)
        method = body.method.type if body.method else "lora"
        method = "lora" if method == "supervised" else method
        if method == "full" and getattr(principal, "role", "admin" if principal is None else "tenant") != "admin":
            raise PermissionDeniedError("A full fine-tune makes the served model's next version: it needs an admin key. Use method `lora`.", param="method")
        if method == "lora" and not cfg.engine.enable_lora:
            raise InvalidRequestError("This deployment does not serve LoRA adapters (engine.enable_lora is off).", param="method")
        settings = body.method and (body.method.lora or body.method.supervised or body.method.full)
        lora_rank = getattr(settings, "rank", 8)
        if method == "lora" and lora_rank > cfg.engine.max_lora_rank:
            raise InvalidRequestError(f"LoRA rank {lora_rank} is above this engine's limit of {cfg.engine.max_lora_rank}.", param="method.lora.rank")
        lora_alpha = getattr(settings, "alpha", None) or 2.0 * lora_rank
        hyper = body.hyperparameters or (settings.hyperparameters if settings else None) or FineTuneHyperparameters()
        price = cfg.billing.price_book.training_price(cfg.model.name) if cfg.billing.enabled else None
        base_version = self._stable(cfg.model.name)
        if base_version is None:
            raise EngineNotReadyError()
        stats = await self._run(self._dataset_stats, tenant, body.training_file, "training_file")
        if body.validation_file:
            await self._run(self._dataset_stats, tenant, body.validation_file, "validation_file")
        epochs = ft.default_epochs if hyper.n_epochs == "auto" else hyper.n_epochs
        if hyper.batch_size != "auto" and hyper.batch_size > ft.max_batch_size:
            raise InvalidRequestError(
                f"batch_size {hyper.batch_size} is above this cluster's limit of {ft.max_batch_size} examples per step (what a training node beside serving holds).",
                param="hyperparameters.batch_size",
            )  # fmt: skip
        job_id = new_job_id()
        job = Job(
            id=job_id, tenant=tenant, key_id=getattr(principal, "key_id", "") or "", model=cfg.model.name, base_version=base_version,
            training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix, method=method, n_epochs=epochs,
            batch_size=ft.default_batch_size if hyper.batch_size == "auto" else hyper.batch_size,
            learning_rate_multiplier=1.0 if hyper.learning_rate_multiplier == "auto" else hyper.learning_rate_multiplier,
            lora_rank=lora_rank, lora_alpha=lora_alpha, seed=body.seed if body.seed is not None else 42, created_at=int(self._clock()),
            fine_tuned_model=fine_tuned_model_id(cfg.model.name, tenant, body.suffix, job_id) if method == "lora" else cfg.model.name,
            estimated_tokens=estimate_tokens(stats.content_bytes, stats.messages, epochs), training_price=str(price if price is not None else 0),
            metadata=dict(body.metadata or {}), created_ts=self._clock(),
        )  # fmt: skip
        return await self._backend.create(job)

    def _dataset_stats(self, tenant: str, file_id: str, param: str) -> Any:
        try:
            path = self._files.data_path(tenant, file_id)
        except MaasError:
            raise InvalidRequestError(f"No file `{file_id}` of yours to train on (upload it with purpose `fine-tune`).", param=param, code="invalid_file") from None
        with open(path, "rb") as fh:
            return check_upload(fh, file_id)

    async def list(self, principal: Any, after: str | None, limit: int) -> dict:
        return await self._backend.list(tenant_of(principal), after, limit)

    async def get(self, principal: Any, job_id: str) -> dict:
        return await self._backend.get(tenant_of(principal), job_id)

    async def events(self, principal: Any, job_id: str, after: str | None, limit: int) -> dict:
        return await self._backend.events(tenant_of(principal), job_id, after, limit)

    async def checkpoints(self, principal: Any, job_id: str, limit: int) -> dict:
        return await self._backend.checkpoints(tenant_of(principal), job_id, limit)

    async def cancel(self, principal: Any, job_id: str) -> dict:
        return await self._backend.cancel(tenant_of(principal), job_id)

    async def all_jobs(self, after: str | None, limit: int) -> dict:
        """Every tenant's jobs (operators)."""
        return await self._backend.list(None, after, limit)

    async def cancel_any(self, job_id: str) -> dict:
        return await self._backend.cancel(None, job_id)
