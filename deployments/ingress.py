"""Serve deployment of the OpenAI-compatible ingress: FastAPI routes over `OpenAIService`, wired to the other stages' handles.

Each request goes to a model version picked by the live traffic plan
(`deployments.core.traffic.TrafficFollower`, re-read every `model.traffic_poll_s`); the
version's postprocessor → generator live in their own Serve application.
With billing on, each replica holds a `BillingClient` connected to the named
billing actor: keys are checked locally, quota is leased, usage is batched.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from common.config import MaasConfig, Price
from common.file_store import FileStore
from common.logs import setup_logging
from deployments.core.adapters import AdapterCatalog
from deployments.core.tokenizer import NearTokenizer, PromptTokenizer, load_hf_tokenizer
from deployments.core.traffic import TrafficFile, TrafficFollower, version_app_name
from deployments.fleet import ServeFleet
from deployments.handles import EmbedderHandleClient, PostprocessorHandleClient, TokenizerHandleClient
from deployments.observability import RayRequestMetrics
from deployments.openai.accounts import AccountsService
from deployments.openai.catalogue import Capabilities, Listing
from deployments.openai.files import FilesService, default_plan
from deployments.openai.fine_tuning import FineTuningService
from deployments.openai.operations import OperationsService
from deployments.openai.routes import build_app
from deployments.openai.service import Backend, EmbeddingBackend, EmbeddingModel, OpenAIService
from deployments.version_app import resolve_model

logger = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, tokenizer: DeploymentHandle, config: dict):
        setup_logging("ingress")
        self._config = cfg = MaasConfig.model_validate(config)
        self._engine_ready: set[str] = set()
        billing = cfg.billing
        self._billing = self._accounts = self._operations = self._admin = None
        on_reject = None
        if billing.enabled:
            from billing import actor
            from billing.client import BillingClient
            from billing.metrics import RayIngressMetrics

            handle = actor.get_or_create(billing)
            handle.configure.remote(billing, "deploy")
            holder = serve.get_replica_context().replica_id.unique_id
            self._metrics = RayIngressMetrics()
            self._billing = BillingClient(billing, actor.ActorTransport(handle), holder, on_outbox=self._metrics.outbox_size)
            on_reject = self._metrics.rejected
            self._admin = actor.admin_client(handle)
            self._accounts = AccountsService(self._admin, billing.price_book.currency, time.time)
            self._operations = OperationsService(ServeFleet(cfg), cfg.model.name)  # the console's traffic and health (admin keys)
            asyncio.get_running_loop().create_task(self._billing.start())
        self._tokenizer = NearTokenizer(_local_tokenizer(cfg), TokenizerHandleClient(tokenizer), cfg.deployments.inline_tokenize_chars)
        self._traffic = TrafficFollower(TrafficFile(cfg.store_root(), cfg.app_name, cfg.model.name), self._backend)
        self._embedding_traffic = {m.name: self._follower(cfg.for_model(m.name)) for m in cfg.models}
        self._service = OpenAIService(
            cfg.model.name,
            self._tokenizer,
            self._traffic,
            is_ready=self._ready,
            billing=self._billing,
            on_reject=on_reject or (lambda tenant, reason: None),
            observer=RayRequestMetrics(),
            limits=cfg.request_limits(),
            adapters=AdapterCatalog(str(cfg.store_root()), cfg.model.name) if cfg.engine.enable_lora else None,
            adapter_price=cfg.billing.price_book.fine_tuned_price(cfg.model.name) if billing.enabled else None,
            listing=Listing.of(cfg, self._stable_price),
            embedding_models=[self._embedding_model(cfg.for_model(m.name), m.cold_start_wait_s) for m in cfg.models],
        )
        self._fine_tuning = None
        if cfg.fine_tuning.enabled:
            from deployments import fine_tunes

            stable = lambda: self._traffic.plan.stable if self._traffic.plan else None  # noqa: E731
            self._fine_tuning = FineTuningService(fine_tunes.client(fine_tunes.get_or_create(cfg)), cfg, stable)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_traffic())]

    def _stable_price(self) -> Price | None:
        plan = self._traffic.plan
        return self._config.billing.price_book.price_for(self._config.model.name, plan.stable) if self._config.billing.enabled and plan is not None else None

    def _follower(self, view: MaasConfig) -> TrafficFollower:
        """An embedding model's versions by its live plan (`view`: the model's config, `MaasConfig.for_model`)."""
        app = lambda version: version_app_name(view.app_name, view.model.name, version)  # noqa: E731
        price = lambda version: view.billing.price_book.price_for(view.model.name, version) if view.billing.enabled else None  # noqa: E731
        return TrafficFollower(
            TrafficFile(view.store_root(), view.app_name, view.model.name),
            lambda version: EmbeddingBackend(version, EmbedderHandleClient(serve.get_deployment_handle("EmbeddingModel", app_name=app(version))), price(version)),
        )

    def _embedding_model(self, view: MaasConfig, wait_s: float) -> EmbeddingModel:
        follower = self._embedding_traffic[view.model.name]

        def price() -> Price | None:
            plan = follower.plan
            return view.billing.price_book.price_for(view.model.name, plan.stable) if view.billing.enabled and plan is not None else None

        listing = Listing(Capabilities.embedding(), Capabilities.embedding(), view.engine.max_model_len, view.billing.price_book.currency, price)
        return EmbeddingModel(view.model.name, follower, listing, wait_s)

    def _backend(self, version: str) -> Backend:
        app = version_app_name(self._config.app_name, self._config.model.name, version)
        price = self._config.billing.price_book.price_for(self._config.model.name, version) if self._config.billing.enabled else None
        asyncio.get_running_loop().create_task(self._wait_for_engine(version, serve.get_deployment_handle("Generator", app_name=app)))
        logger.info("traffic: version %s served by application %s", version, app)
        consumer = serve.get_replica_context().replica_id.unique_id
        return Backend(version, PostprocessorHandleClient(serve.get_deployment_handle("Postprocessor", app_name=app), consumer), price)

    async def _follow_traffic(self) -> None:
        while True:
            try:
                for follower in (self._traffic, *self._embedding_traffic.values()):
                    if follower.refresh():
                        logger.info("traffic plan of %s revision %d (%s): %s", follower.plan.model, follower.plan.revision, follower.plan.action, follower.plan.weights())
            except Exception:  # a plan being replaced or a store hiccup: keep the current plan
                logger.exception("could not read the traffic plan")
            await asyncio.sleep(self._config.model.traffic_poll_s)

    def _ready(self) -> bool:
        plan = self._traffic.plan
        return plan is not None and plan.stable in self._engine_ready and (self._billing is None or self._billing.synced)

    async def _wait_for_engine(self, version: str, generator: DeploymentHandle) -> None:
        """Answer 503 until the stable version's generator reports its engine loaded (once; Serve routes around later restarts)."""
        while version not in self._engine_ready:
            try:
                if await generator.ready.remote():
                    self._engine_ready.add(version)
                    logger.info("generator of %s ready", version)
                    return
            except Exception as exc:  # not deployed yet, or restarting
                logger.debug("generator of %s not ready: %s", version, exc)
            await asyncio.sleep(1.0)

    async def check_health(self) -> None:
        """Serve replaces a replica that has not reached the billing actor for too long (it answers 503 meanwhile)."""
        reason = self._billing.health() if self._billing is not None else None
        if reason is not None:
            raise RuntimeError(reason)

    async def traffic(self) -> dict | None:
        """The plan this replica follows (for operators and the CLI)."""
        return self._traffic.plan.to_json() if self._traffic.plan else None

    def __serve_build_asgi_app__(self):
        limits = self._config.request_limits()
        files = FilesService(FileStore(self._config.store_root()), plan_of=self._admin.plan if self._admin is not None else default_plan)
        return build_app(self._service, self._accounts, limits.max_body_bytes, self._operations, files, limits.max_file_bytes, self._fine_tuning)

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._billing is not None:
            await self._billing.close()


def _local_tokenizer(cfg: MaasConfig) -> PromptTokenizer | None:
    """The tokenizer stage's logic, for the prompts this replica tokenizes itself (versions of a model share a tokenizer)."""
    if not cfg.deployments.inline_tokenize_chars:
        return None
    try:
        return PromptTokenizer(load_hf_tokenizer(resolve_model(cfg).path), cfg.engine.max_model_len)
    except Exception as exc:  # the tokenizer stage still tokenizes everything
        logger.warning("prompts will all be tokenized by the tokenizer stage: the model's tokenizer did not load here: %s", exc)
        return None
