"""Serve deployment of the OpenAI-compatible ingress: FastAPI routes over `OpenAIService`, wired to the other stages' handles.

Each request goes to a model version picked by the live traffic plan
(`deployments.core.traffic.TrafficFollower`, re-read every `model.traffic_poll_s`); the
version's generator (and postprocessor, with `deployments.inline_postprocess: false`) live in their
own Serve application. By default the ingress detokenizes and shapes responses itself, from the
generator's carrier.
With billing on, each replica holds a `BillingClient` connected to the named
billing actor: keys are checked locally, quota is leased, usage is batched.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from common.config import MaasConfig, Price
from common.errors import MaasError
from common.file_store import FileStore
from common.logs import setup_logging
from deployments.core.adapters import AdapterCatalog
from deployments.core.postprocessor import InlinePostprocessor, rust_writer
from deployments.core.tokenizer import NearTokenizer, PromptTokenizer, load_hf_tokenizer
from deployments.core.traffic import TrafficFile, TrafficFollower, version_app_name
from deployments.fleet import ServeFleet
from deployments.handles import EmbedderHandleClient, PostprocessorHandleClient, RelayClient, TokenizerHandleClient
from deployments.observability import RayRequestMetrics
from deployments.openai.accounts import AccountsService
from deployments.openai.batches import BatchesService
from deployments.openai.catalogue import Capabilities, Listing
from deployments.openai.files import FilesService, default_plan
from deployments.openai.fine_tuning import FineTuningService
from deployments.openai.operations import OperationsService
from deployments.openai.routes import build_app, run_batch_line
from deployments.openai.service import Backend, EmbeddingBackend, EmbeddingModel, OpenAIService
from deployments.version_app import resolve_model

logger = logging.getLogger(__name__)


def _stable_price(view: MaasConfig, follower: TrafficFollower) -> Callable[[], Price | None]:
    """The price of a model's stable version now (what `/v1/models` shows); None with billing off."""

    def price() -> Price | None:
        plan = follower.plan
        return view.billing.price_book.price_for(view.model.name, plan.stable) if view.billing.enabled and plan is not None else None

    return price


class _ChatModel:
    """One chat model as the ingress serves it: its tokenizer, its versions by its live plan, its engines' readiness."""

    def __init__(self, view: MaasConfig, tokenizer: DeploymentHandle, synced: Callable[[], bool]):
        self.view = view
        self._synced = synced
        self.engine_ready: set[str] = set()
        local = _local_tokenizer(view)
        self.tokenizer = NearTokenizer(
            PromptTokenizer(local, view.engine.max_model_len) if local is not None and view.deployments.inline_tokenize_chars else None,
            TokenizerHandleClient(tokenizer),
            view.deployments.inline_tokenize_chars,
        )
        self._writer = rust_writer(local) if view.deployments.inline_postprocess else None
        self.traffic = TrafficFollower(TrafficFile(view.store_root(), view.app_name, view.model.name), self._backend)

    def service(self, billing: Any, on_reject: Callable[[str, str], None], **kwargs: Any) -> OpenAIService:
        view = self.view
        return OpenAIService(
            view.model.name,
            self.tokenizer,
            self.traffic,
            is_ready=self.ready,
            billing=billing,
            on_reject=on_reject,
            observer=RayRequestMetrics(),
            limits=view.request_limits(),
            adapters=AdapterCatalog(str(view.store_root()), view.model.name) if view.engine.enable_lora else None,
            adapter_price=view.billing.price_book.fine_tuned_price(view.model.name) if billing is not None else None,
            listing=Listing.of(view, _stable_price(view, self.traffic)),
            first_piece_wait_s=view.model.cold_start_wait_s if view.deployments.generator.autoscaling.min_replicas == 0 else None,
            **kwargs,
        )

    def ready(self) -> bool:
        plan = self.traffic.plan
        return plan is not None and plan.stable in self.engine_ready and self._synced()

    def _backend(self, version: str) -> Backend:
        view = self.view
        app = version_app_name(view.app_name, view.model.name, version)
        price = view.billing.price_book.price_for(view.model.name, version) if view.billing.enabled else None
        asyncio.get_running_loop().create_task(self._wait_for_engine(version, serve.get_deployment_handle("Generator", app_name=app)))
        logger.info("traffic: %s %s served by application %s", view.model.name, version, app)
        consumer = serve.get_replica_context().replica_id.unique_id
        if self._writer is not None:  # detokenized and shaped here, from the generator's carrier
            generator = RelayClient(serve.get_deployment_handle("Generator", app_name=app), "generate", consumer)
            return Backend(version, InlinePostprocessor(self._writer, generator), price)
        return Backend(version, PostprocessorHandleClient(serve.get_deployment_handle("Postprocessor", app_name=app), consumer), price)

    async def _wait_for_engine(self, version: str, generator: DeploymentHandle) -> None:
        """Answer 503 until the stable version's generator reports its engine loaded (once; Serve routes around later restarts)."""
        while version not in self.engine_ready:
            try:
                if await generator.ready.remote():
                    self.engine_ready.add(version)
                    logger.info("generator of %s %s ready", self.view.model.name, version)
                    return
            except Exception as exc:  # not deployed yet, or restarting
                logger.debug("generator of %s not ready: %s", version, exc)
            await asyncio.sleep(1.0)


def _embedding_model(view: MaasConfig, wait_s: float) -> tuple[EmbeddingModel, TrafficFollower]:
    """An embedding model's versions by its live plan, and its catalogue entry (`view`: the model's config)."""
    app = lambda version: version_app_name(view.app_name, view.model.name, version)  # noqa: E731
    price = lambda version: view.billing.price_book.price_for(view.model.name, version) if view.billing.enabled else None  # noqa: E731
    follower = TrafficFollower(
        TrafficFile(view.store_root(), view.app_name, view.model.name),
        lambda version: EmbeddingBackend(version, EmbedderHandleClient(serve.get_deployment_handle("EmbeddingModel", app_name=app(version))), price(version)),
    )
    listing = Listing(Capabilities.embedding(), Capabilities.embedding(), view.engine.max_model_len, view.billing.price_book.currency, _stable_price(view, follower))
    return EmbeddingModel(view.model.name, follower, listing, wait_s), follower


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, tokenizer: DeploymentHandle, config: dict, tokenizers: dict[str, DeploymentHandle] | None = None):
        """`tokenizer`: the chat model's tokenizer stage; `tokenizers`: those of the chat models served beside it, by name."""
        setup_logging("ingress")
        self._config = cfg = MaasConfig.model_validate(config)
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
        synced = lambda: self._billing is None or self._billing.synced  # noqa: E731
        on_reject = on_reject or (lambda tenant, reason: None)
        main = _ChatModel(cfg, tokenizer, synced)
        others = [_ChatModel(cfg.for_model(name), handle, synced) for name, handle in (tokenizers or {}).items()]
        embedding = [_embedding_model(cfg.for_model(m.name), m.cold_start_wait_s) for m in cfg.models if m.task == "embed"]
        self._traffic = main.traffic
        self._followers = [main.traffic, *(m.traffic for m in others), *(f for _, f in embedding)]
        self._service = main.service(
            self._billing, on_reject, chat_models=[m.service(self._billing, on_reject) for m in others], embedding_models=[e for e, _ in embedding]
        )
        self._fine_tuning = None
        if cfg.fine_tuning.enabled:
            from deployments import fine_tunes

            followers = {m.view.model.name: m.traffic for m in (main, *others)}

            def stable(model: str) -> str | None:
                """The stable version of a chat model now (what a fine-tune of it trains on)."""
                plan = followers[model].plan if model in followers else None
                return plan.stable if plan is not None else None

            self._fine_tuning = FineTuningService(fine_tunes.client(fine_tunes.get_or_create(cfg)), cfg, stable)
        self._batches = None
        self._lines: set[asyncio.Task] = set()  # batch lines running (kept referenced while shielded)
        if cfg.batches.enabled:
            from deployments import batches

            self._batches = BatchesService(batches.client(batches.get_or_create(cfg)))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_traffic())]

    async def _follow_traffic(self) -> None:
        while True:
            try:
                for follower in self._followers:
                    if follower.refresh():
                        logger.info("traffic plan of %s revision %d (%s): %s", follower.plan.model, follower.plan.revision, follower.plan.action, follower.plan.weights())
            except Exception:  # a plan being replaced or a store hiccup: keep the current plan
                logger.exception("could not read the traffic plan")
            await asyncio.sleep(self._config.model.traffic_poll_s)

    async def check_health(self) -> None:
        """Serve replaces a replica that has not reached the billing actor for too long (it answers 503 meanwhile)."""
        reason = self._billing.health() if self._billing is not None else None
        if reason is not None:
            raise RuntimeError(reason)

    async def batch_line(self, key_id: str, url: str, body: dict, request_id: str) -> tuple[int, dict]:
        """One line of a batch, from the batch actor: run as a request of the key that created the batch, at the batch
        tier, under the line's fixed request id; (status, response body or error envelope).

        A line runs to its end even when the actor that asked for it dies meanwhile (shielded from the call's
        cancellation): it is billed for all it made, once, and the restarted actor's run of it is billed no more."""
        principal = None
        if self._billing is not None:
            try:
                principal = self._billing.key_by_id(key_id)
            except MaasError as exc:
                return exc.status_code, exc.to_envelope()
        # A context of its own: Serve cancels the calls a cancelled request made (it finds them through the request's
        # context), so a line's calls to the other stages must not belong to the actor's call.
        line = asyncio.get_running_loop().create_task(run_batch_line(self._service, principal, url, body, request_id), context=contextvars.Context())
        self._lines.add(line)
        line.add_done_callback(self._lines.discard)
        return await asyncio.shield(line)

    async def traffic(self) -> dict | None:
        """The plan this replica follows (for operators and the CLI)."""
        return self._traffic.plan.to_json() if self._traffic.plan else None

    def __serve_build_asgi_app__(self):
        limits = self._config.request_limits()
        files = FilesService(FileStore(self._config.store_root()), plan_of=self._admin.plan if self._admin is not None else default_plan)
        return build_app(self._service, self._accounts, limits.max_body_bytes, self._operations, files, limits.max_file_bytes, self._fine_tuning, self._batches)

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._billing is not None:
            await self._billing.close()


def _local_tokenizer(cfg: MaasConfig) -> Any:
    """The model's tokenizer, for the prompts this replica tokenizes and the responses it writes itself (versions of a
    model share a tokenizer); None when it does neither."""
    if cfg.deployments.inline_postprocess:  # no postprocessor stage is deployed: without it nothing is served
        return load_hf_tokenizer(resolve_model(cfg).path)
    if not cfg.deployments.inline_tokenize_chars:
        return None
    try:
        return load_hf_tokenizer(resolve_model(cfg).path)
    except Exception as exc:  # the tokenizer stage still tokenizes everything
        logger.warning("prompts will all be tokenized by the tokenizer stage: the model's tokenizer did not load here: %s", exc)
        return None
