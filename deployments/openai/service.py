"""The ingress's logic: authenticate, validate the model, prepare the prompt, admit, drive the postprocessor, meter.

It talks to the other stages through small interfaces, so the Serve wrapper
plugs in deployment handles and the billing client, and unit tests plug in
in-process fakes.  Every admitted request is settled exactly once: with the
usage the postprocessor reported, or, when the client went away or the request
failed mid-way, with the completion count left to the engine's own report.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, NamedTuple, Protocol, Sequence

from common.config import MaasConfig, Price, RequestLimits
from common.errors import EngineNotReadyError, InvalidRequestError, MaasError, ModelNotFoundError, NotFoundError, PermissionDeniedError, ServiceUnavailableError, as_maas_error
from billing.pricing import TierChoice
from deployments.core import embeddings, shapes, tools
from deployments.core.adapters import Adapter, AdapterCatalog
from deployments.core.embeddings import Embedded
from deployments.core.types import GenerationRequest, SSEPiece, TokenizedPrompt, Usage, piece_usage
from deployments.core.tokenizer import TokenizingClient as TokenizerClient
from deployments.openai.catalogue import Capabilities, Listing, model_card, pricing
from deployments.openai.files import NO_TENANT
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

SSEStream = AsyncIterator[SSEPiece]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """How one request ended, as the ingress saw it: what metrics and the request log line are made of.

    `status` is `ok`, `aborted` (the client went away) or the error's code/type. `ttft_s` is the time from
    arrival to the first streamed piece (the whole response when not streaming); `itl_s` is the mean gap
    between completion tokens after the first (None with fewer than two).
    """

    request_id: str
    model: str
    version: str
    tenant: str
    kind: str
    stream: bool
    status: str
    prompt_tokens: int
    completion_tokens: int | None
    ttft_s: float | None
    itl_s: float | None
    duration_s: float


class RequestObserver(Protocol):
    """Receives every request's record once (the Serve wrapper's turns them into Ray metrics)."""

    def finished(self, record: RequestRecord) -> None: ...



class PostprocessorClient(Protocol):
    def stream(self, req: GenerationRequest) -> SSEStream: ...

    async def complete(self, req: GenerationRequest) -> dict: ...


class Backend(NamedTuple):
    """One model version's generation path, and what its tokens cost (for a fine-tune: its adapter on that version)."""

    version: str
    postprocessor: PostprocessorClient
    price: Any = None
    model: str = ""  # the model id billed and answered, when not the base's (a fine-tune's `ft:` id)
    adapter: tuple[str, str] | None = None  # (model id, adapter folder) the engine applies


class EmbedderClient(Protocol):
    async def embed(self, request_id: str, items: list[Any], billing: Any = None, dimensions: int | None = None) -> Embedded: ...


class EmbeddingBackend(NamedTuple):
    """One version of an embedding model, and what its input tokens cost."""

    version: str
    embedder: EmbedderClient
    price: Any = None


@dataclass(frozen=True)
class EmbeddingModel:
    """An embedding model the deployment serves: its versions (by the live plan), its catalogue entry, and how long a
    request waits for it when it was scaled to zero before a 503 with Retry-After."""

    name: str
    backends: "BackendPicker"  # its `pick()` gives an EmbeddingBackend
    listing: Listing = Listing(Capabilities.embedding())
    wait_s: float = 120.0


class BackendPicker(Protocol):
    """Chooses the version that serves the next request (traffic split); the Serve wrapper's follows the live plan."""

    def pick(self) -> Backend: ...

    def serving(self, version: str) -> Backend | None:
        """The backend of `version` if it is deployed (with traffic or as the rollback target), else None."""
        ...


class StaticPicker:
    """Every request to one backend."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def pick(self) -> Backend:
        return self._backend

    def serving(self, version: str) -> Backend | None:
        return self._backend if self._backend.version == version else None


class BillingGate(Protocol):
    """What the service needs from billing (`billing.client.BillingClient` implements it)."""

    async def authenticate(self, authorization: str | None) -> Any: ...

    async def require_admin(self, authorization: str | None) -> Any: ...

    async def admit(
        self, key: Any, request_id: str, model: str, version: str, kind: str, price: Any, prompt_tokens: int, max_tokens: int, n: int = 1, end_user: str = "",
        service_tier: str = "default",
    ) -> Any: ...

    def service_tier(self, key: Any, requested: str | None) -> Any:
        """The request's `TierChoice` (`billing.pricing`) under the key's plan, or a 403 for a tier it does not offer."""
        ...

    async def resize(self, ticket: Any, prompt_tokens: int, max_tokens: int, n: int = 1) -> Any: ...

    def release(self, ticket: Any) -> None: ...

    def settle(self, ticket: Any, prompt_tokens: int, completion_tokens: int | None, status: str, delivered_tokens: int = 0, cached_tokens: int = 0) -> None: ...

    def rate_state(self, tenant: str) -> Any: ...

def require_allowed(principal: Any, model: str) -> None:
    """A key with an allow-list of its own may spend money only on those models: inference and fine-tuning alike."""
    allows = getattr(principal, "allows", None)
    if allows is not None and not allows(model):
        raise PermissionDeniedError(f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed")


FREE = Price(prompt_per_1m=0, completion_per_1m=0)  # a call that changes state: counted against rate limits, never billed


class OpenAIService:
    """Chat and text completions over the tokenizer and postprocessor stages, metered through an optional BillingGate."""

    def __init__(
        self,
        model_name: str,
        tokenizer: TokenizerClient,
        backends: BackendPicker,
        is_ready: Callable[[], bool] = lambda: True,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        billing: BillingGate | None = None,
        on_reject: Callable[[str, str], None] = lambda tenant, reason: None,
        observer: RequestObserver | None = None,
        limits: RequestLimits | None = None,
        adapters: AdapterCatalog | None = None,
        adapter_price: Any = None,
        listing: Listing | None = None,
        embedding_models: Sequence[EmbeddingModel] = (),
        chat_models: Sequence["OpenAIService"] = (),
        first_piece_wait_s: float | None = None,
    ):
        """`limits` bound what one request may send, checked before any other stage is called; `adapters`: tenants' fine-tunes."""
        self.model_name = model_name
        self._adapters = adapters
        self._adapter_price = adapter_price
        self._listing = listing or Listing()
        self._embedding = {m.name: m for m in embedding_models}
        self._first_piece_wait_s = first_piece_wait_s  # a model that scales to zero: how long a stream waits for its engine
        self._others = {m.model_name: m for m in chat_models}  # chat models served beside this one, each with its own service
        self._catalogue = self.served
        for other in self._others.values():
            other._catalogue = self._catalogue  # an unknown model's 404 names the whole catalogue
        self._limits = limits or MaasConfig().request_limits()
        self._tokenizer = tokenizer
        self._backends = backends
        self._is_ready = is_ready
        self._new_request_id = new_request_id
        self._created = int(time.time())
        self.billing = billing
        self._on_reject = on_reject
        self._observer = observer

    async def authenticate(self, authorization: str | None) -> Any:
        """The caller's key record (None when billing is off), or a 401."""
        if self.billing is None:
            return None
        try:
            return await self.billing.authenticate(authorization)
        except MaasError as exc:
            self._on_reject("", exc.code or "invalid_api_key")
            raise

    async def require_admin(self, authorization: str | None) -> Any:
        if self.billing is None:
            raise NotFoundError("Administration needs billing enabled.")
        return await self.billing.require_admin(authorization)

    async def admit_call(self, principal: Any) -> None:
        """A call that changes state (an upload, a fine-tuning job, a key): it takes a request slot of the tenant's
        (and the key's own) rate limits as a request does, with no tokens and nothing to bill; a 429 past them."""
        if self.billing is None or principal is None:
            return
        try:
            ticket = await self.billing.admit(principal, f"call-{self._new_request_id()}", self.model_name, "-", "call", FREE, 0, 0, 1)
        except MaasError as exc:
            self._on_reject(principal.tenant, exc.error_type if exc.status_code == 429 else (exc.code or "error"))
            raise
        self.billing.release(ticket)

    def rate_headers(self, principal: Any) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the caller's tenant (`billing.quota.RateState`); none without limits."""
        if self.billing is None or principal is None:
            return {}
        state = self.billing.rate_state(principal.tenant)
        return state.headers() if state is not None else {}

    def models(self, principal: Any = None) -> dict:
        """The base model, and the caller's own fine-tunes (no one else's), each with what it can do and its price."""
        ls = self._listing
        data = [model_card(self.model_name, self._created, "ray-maas", ls.capabilities, ls.context_window, pricing(ls.price(), ls.currency))]
        if self._adapters is not None:
            tenant = getattr(principal, "tenant", None) or NO_TENANT
            price = pricing(self._adapter_price, ls.currency)
            data += [
                model_card(a.model, a.created, a.tenant, ls.fine_tune_capabilities, ls.context_window, price, parent=a.base, root=a.base)
                for a in self._adapters.for_tenant(tenant)
            ]
        for other in self._others.values():
            data += other.models(principal)["data"]
        for m in self._embedding.values():
            ls = m.listing
            data.append(model_card(m.name, self._created, "ray-maas", ls.capabilities, ls.context_window, pricing(ls.price(), ls.currency)))
        return {"object": "list", "data": data}

    def ready(self) -> bool:
        return self._is_ready()

    def _serving(self, model: str) -> "OpenAIService":
        """The chat model's service that answers `model` (its base name or one of its fine-tunes); this one otherwise."""
        for name, other in self._others.items():
            if model == name or model.startswith(f"ft:{name}:"):
                return other
        return self

    @property
    def served(self) -> list[str]:
        """Every model this API serves, the chat models first."""
        return [self.model_name, *self._others, *self._embedding]

    async def chat(self, body: ChatCompletionRequest, principal: Any = None, run_as: "RunAs | None" = None) -> dict | SSEStream:
        """`run_as`: a batch line's fixed request id and tier (`deployments.core.batches`); None: a request of the API's own."""
        if (other := self._serving(body.model)) is not self:
            return await other.chat(body, principal, run_as)
        tools.check_tool_choice(body.tool_dicts, body.tool_choice_value, body.response_format, "parallel_tool_calls" in body.model_fields_set)
        spec, forced, shown = tools.response_format_for(body.tool_dicts or [], body.tool_choice_value, body.parallel_tool_calls)
        if spec is not None and spec.mode == "auto" and not self._limits.tool_calls:
            raise InvalidRequestError("This model does not answer tool_choice `auto` (model.tool_calls is off); use `required` or name a function.", param="tool_choice")
        if forced is not None and not self._limits.structured_outputs:
            raise InvalidRequestError("This deployment cannot force a tool call (engine.structured_outputs is off); use tool_choice `auto`.", param="tool_choice")
        history = [{"role": m.role, "content": m.text(), "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None} for m in body.messages]
        messages = tools.render_messages(history, shown)
        return await self._handle("chat", body, principal, lambda rid: self._tokenizer.prepare_chat(messages, body.token_limit, request_id=rid), spec, forced, run_as)

    async def completion(self, body: CompletionRequest, principal: Any = None, run_as: "RunAs | None" = None) -> dict | SSEStream:
        if (other := self._serving(body.model)) is not self:
            return await other.completion(body, principal, run_as)
        prompts = body.prompts
        if len(prompts) == 1:
            return await self._handle("completion", body, principal, lambda rid: self._tokenizer.prepare_completion(prompts[0], body.token_limit, request_id=rid), run_as=run_as)
        return await self._many(body, principal, prompts, run_as)

    async def embed(self, body: EmbeddingRequest, principal: Any = None, run_as: "RunAs | None" = None) -> dict:
        """`/v1/embeddings`: admitted, metered and billed as any request (the model's price per input token), on the
        embedding model's live version. Its input is reserved by a bound before it is tokenized (where the engine
        runs) and settled at the engine's count. A model scaled to zero is started by the request, which waits for it
        up to the model's `wait_s`, then gets a 503 with Retry-After."""
        t0 = time.monotonic()
        request_id = run_as.request_id if run_as is not None else self._new_request_id()
        tier = run_as.tier if run_as is not None else "default"
        base = self._record_base(request_id, "embedding", body, principal, "", 0) | {"model": body.model}
        ticket = None
        try:
            model = self._embedding.get(body.model)
            if model is None:
                raise ModelNotFoundError(f"`{body.model}` is not an embedding model here. Embedding models: {', '.join(self._embedding) or 'none'}.", param="model")
            require_allowed(principal, body.model)
            items = embeddings.items_of(body.input)
            backend: EmbeddingBackend = model.backends.pick()
            base["version"] = backend.version
            if self.billing is not None and principal is not None:
                try:
                    ticket = await self.billing.admit(
                        principal, request_id, body.model, backend.version, "embedding", backend.price, 1, 0, 1, end_user=body.user or "", service_tier=tier
                    )
                except MaasError as exc:
                    self._on_reject(principal.tenant, exc.error_type if exc.status_code == 429 else (exc.code or "error"))
                    raise
                try:
                    ticket = await self.billing.resize(ticket, embeddings.token_bound(items), 0, 1)
                except BaseException:
                    self.billing.release(ticket)
                    raise
        except BaseException as exc:
            _Meter(None, None, 0, self._observer, base, t0).failed(exc)
            raise
        meter = _Meter(self.billing if ticket is not None else None, ticket, 0, self._observer, base, t0)
        try:
            call = backend.embedder.embed(request_id, items, ticket.context() if ticket is not None else None, body.dimensions)
            embedded = await asyncio.wait_for(call, model.wait_s)
        except asyncio.TimeoutError:
            err = EngineNotReadyError(f"`{body.model}` did not answer within {model.wait_s:g} s (it may be starting from zero replicas); retry shortly.")
            meter.failed(err)
            raise err from None
        except BaseException as exc:
            # A 400 raised before the engine ran is billed nothing; a server fault leaves the engine witness's count.
            meter.failed(exc)
            raise
        meter.embedded(embedded.prompt_tokens)
        return embeddings.response(body.model, embedded, body.encoding_format)

    async def _many(self, body: CompletionRequest, principal: Any, prompts: list[str | list[int]], run_as: "RunAs | None" = None) -> dict | SSEStream:
        """A list of prompts: one sub-request per prompt (`<id>-<i>`, each admitted, metered and billed as a request),
        one response named by the group id with each prompt's choices after the previous one's. Every prompt is
        admitted and tokenized before any runs; if one is refused, none runs and nothing is billed."""
        group = run_as.engine_id() if run_as is not None else self._new_request_id()

        def prepare(i: int, prompt: str | list[int]) -> Any:
            return self._prepare(
                "completion", body, principal, lambda rid: self._tokenizer.prepare_completion(prompt, body.token_limit, request_id=rid), f"{group}-{i}", group, i * body.n,
                run_as,
            )

        prepared = await asyncio.gather(*(_isolated(prepare(i, p)) for i, p in enumerate(prompts)), return_exceptions=True)
        failed = next((p for p in prepared if isinstance(p, BaseException)), None)
        if failed is not None:
            for p in prepared:
                if not isinstance(p, BaseException) and p.ticket is not None:
                    self.billing.release(p.ticket)  # type: ignore[union-attr]
            raise failed
        results = await asyncio.gather(*(_isolated(self._run(*p)) for p in prepared), return_exceptions=True)  # type: ignore[misc]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            for r in results:
                if isinstance(r, MeteredStream):
                    await r.aclose()
            raise failed
        if not body.stream:
            return merge_responses(results)  # type: ignore[arg-type]
        first: GenerationRequest = prepared[0].req  # type: ignore[union-attr]
        return MergedStream(results, lambda usage: shapes.sse_end(first, usage))  # type: ignore[arg-type]

    async def _handle(
        self, kind: str, body: ChatCompletionRequest | CompletionRequest, principal: Any, prepare: Callable[[str], Any], tool_spec: Any = None, forced: dict | None = None,
        run_as: "RunAs | None" = None,
    ) -> dict | SSEStream:
        """`tool_spec`/`forced`: a chat with tools, how its calls are parsed and the structured output that forces one."""
        request_id = run_as.engine_id() if run_as is not None else self._new_request_id()
        prepared = await self._prepare(kind, body, principal, prepare, request_id, run_as=run_as)
        if tool_spec is not None:
            prepared = prepared._replace(req=dataclasses.replace(prepared.req, tools=tool_spec, response_format=forced or prepared.req.response_format))
        return await self._run(*prepared)

    async def _prepare(
        self, kind: str, body: ChatCompletionRequest | CompletionRequest, principal: Any, prepare: Callable[[str], Any], request_id: str, group: str = "", choice_offset: int = 0,
        run_as: "RunAs | None" = None,
    ) -> "_Prepared":
        """Check, pick the version, take the request slot, tokenize, reserve the true worst case.

        The request slot (and a one-token placeholder) is taken before tokenizing, so a tenant at its rate
        or budget gets nothing tokenized; the version is chosen before tokenizing too (versions of a model
        share its tokenizer) and the whole request, stream included, stays on it.
        """
        t0 = time.monotonic()
        trace = {"ingress_in": time.time()}  # wall-clock marks for the request's log line (bench/trace.py)
        version = ""
        try:
            adapter = self._check_model(body.model, principal)
            check_limits(body, self._limits)
            tier = self._tier(body.service_tier, principal) if run_as is None else dataclasses.replace(self._tier(None, principal), tier=run_as.tier)
            backend = self._backends.pick() if adapter is None else self._adapter_backend(adapter)
            version = backend.version
            ledger_id = _ledger_id(request_id, run_as)  # a batch line's attempt is billed under the line's fixed id
            ticket = await self._admit(ledger_id, kind, body, principal, backend, tier.tier)
            trace["ingress_admitted"] = time.time()
        except BaseException as exc:
            _Meter(None, None, 0, self._observer, self._record_base(request_id, kind, body, principal, version, 0), t0).failed(exc)
            raise
        try:
            prompt = await prepare(request_id)
            trace["ingress_tokenized"] = time.time()
            req = dataclasses.replace(
                self._request(request_id, kind, body, prompt), model=backend.model or self.model_name, adapter=backend.adapter, model_version=version, group=group, choice_offset=choice_offset,
                service_tier=tier.tier, share_weight=tier.share_weight,
            )
            if ticket is not None:
                ticket = await self.billing.resize(ticket, len(req.prompt_token_ids), req.max_tokens, req.n)  # type: ignore[union-attr]
                req = dataclasses.replace(req, billing=ticket.context())  # the generator's witness reports with it
        except BaseException as exc:
            # Refused before it ran (bad input, context too long): nothing to bill.
            if ticket is not None:
                self.billing.release(ticket)  # type: ignore[union-attr]
            _Meter(None, None, 0, self._observer, self._record_base(request_id, kind, body, principal, version, 0), t0).failed(exc)
            raise
        return _Prepared(req, principal, backend, ticket, t0, trace)

    def _tier(self, requested: str | None, principal: Any) -> TierChoice:
        """The tier the request runs at: its plan's choice (a 403 for a tier the plan does not offer); without billing, what it asked for."""
        if self.billing is None or principal is None:
            return TierChoice("default" if requested in (None, "auto") else requested)  # type: ignore[arg-type]
        return self.billing.service_tier(principal, requested)

    def _record_base(self, request_id: str, kind: str, body: Any, principal: Any, version: str, prompt_tokens: int) -> dict:
        tenant = getattr(principal, "tenant", "") or ""
        return {"request_id": request_id, "model": self.model_name, "version": version, "tenant": tenant, "kind": kind, "stream": bool(getattr(body, "stream", False)), "prompt_tokens": prompt_tokens}

    def _check_model(self, model: str, principal: Any = None) -> Adapter | None:
        """None for the base model, the adapter for one of the caller's fine-tunes; a 404 for anything else (another tenant's included)."""
        adapter = None
        if model != self.model_name:
            if self._adapters is None or not model.startswith(f"ft:{self.model_name}:"):
                raise ModelNotFoundError(f"The model `{model}` does not exist. Available: {', '.join(self._catalogue or [self.model_name])}.", param="model")
            adapter = self._adapters.resolve(model, getattr(principal, "tenant", None) or NO_TENANT)
        require_allowed(principal, model)
        if not self._is_ready():
            raise EngineNotReadyError()
        return adapter

    def _adapter_backend(self, adapter: Adapter) -> Backend:
        """The base version the adapter was trained on, with the adapter applied: no new engine per fine-tune."""
        base = self._backends.serving(adapter.base_version)
        if base is None:
            raise ServiceUnavailableError(f"`{adapter.model}` was trained on {self.model_name} {adapter.base_version}, which is not being served now.")
        return Backend(adapter.version, base.postprocessor, self._adapter_price, adapter.model, (adapter.model, adapter.path))

    def _request(self, request_id: str, kind: str, body: ChatCompletionRequest | CompletionRequest, prompt: TokenizedPrompt) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id,
            model=self.model_name,
            kind=kind,  # type: ignore[arg-type]
            prompt_token_ids=prompt.prompt_token_ids,
            max_tokens=prompt.max_tokens,
            created=int(time.time()),
            n=body.n,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=body.stop_list,
            stop_token_ids=prompt.stop_token_ids,
            ignore_eos=body.ignore_eos,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            logit_bias=body.token_bias,
            stream=body.stream,
            include_usage=body.include_usage,
            logprobs=body.engine_logprobs,
            echo=getattr(body, "echo", False),
            prompt_logprobs=getattr(body, "prompt_logprobs", None),
            prompt_only=getattr(body, "prompt_only", False),
            response_format=body.response_format,
        )

    async def _run(self, req: GenerationRequest, principal: Any, backend: Backend, ticket: Any, t0: float, trace: dict | None = None) -> dict | SSEStream:
        base = {**self._record_base(req.request_id, req.kind, req, principal, backend.version, len(req.prompt_token_ids)), "model": req.model}
        meter = _Meter(self.billing if ticket is not None else None, ticket, len(req.prompt_token_ids), self._observer, base, t0, trace)
        post = backend.postprocessor
        meter.mark("ingress_sent")
        if not req.stream:
            try:
                result = await post.complete(req)
            except BaseException as exc:
                meter.failed(exc)
                raise
            meter.first_piece()
            meter.done(result["usage"])
            return result
        stream = post.stream(req)
        try:
            # Wait for the first piece so that errors before any token still get a proper HTTP status.
            first = await self._first_piece(stream)
        except BaseException as exc:
            meter.failed(exc)
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        meter.first_piece()
        return MeteredStream(first, stream, meter)

    async def _first_piece(self, stream: SSEStream) -> SSEPiece:
        """A stream's first piece; for a model that scales to zero, a 503 with Retry-After past its wait (its engine
        is starting from zero replicas, or not answering)."""
        if self._first_piece_wait_s is None:
            return await stream.__anext__()
        try:
            return await asyncio.wait_for(stream.__anext__(), self._first_piece_wait_s)
        except TimeoutError:
            raise EngineNotReadyError(f"`{self.model_name}` did not start answering within {self._first_piece_wait_s:g} s (it may be starting from zero replicas); retry shortly.") from None

    async def _admit(self, request_id: str, kind: str, body: ChatCompletionRequest | CompletionRequest, principal: Any, backend: Backend, tier: str = "default") -> Any:
        """The request slot and a one-token placeholder at `tier`'s prices (None when billing is off), or a 429 / quota error."""
        if self.billing is None or principal is None:
            return None
        try:
            return await self.billing.admit(
                principal, request_id, backend.model or self.model_name, backend.version, kind, backend.price, 1, 0, 1, end_user=body.user or "", service_tier=tier
            )
        except MaasError as exc:
            self._on_reject(principal.tenant, exc.error_type if exc.status_code == 429 else (exc.code or "error"))
            raise


class RunAs(NamedTuple):
    """A request the API runs on a tenant's behalf (a batch line): its fixed request id (so it is billed once however
    often it runs) and its tier. Each run is an attempt of its own inside the graph (`<id>.<attempt>`: two attempts of
    one line may overlap when its runner restarts), billed under the fixed id by both witnesses."""

    request_id: str
    tier: str = "batch"
    attempt: str = ""

    def engine_id(self) -> str:
        return f"{self.request_id}.{self.attempt or uuid.uuid4().hex[:8]}"


def _ledger_id(engine_id: str, run_as: RunAs | None) -> str:
    """The id a request is billed under: its own, or for a batch line's attempt (`<id>.<attempt>`, a list of prompts'
    sub-request `<id>.<attempt>-<i>`) the line's fixed id (`<id>`, `<id>-<i>`)."""
    if run_as is None or not engine_id.startswith(run_as.request_id + "."):
        return engine_id
    rest = engine_id[len(run_as.request_id) + 1 :]
    _, dash, index = rest.partition("-")
    return run_as.request_id + (dash + index if dash else "")


def _isolated(coro: Any) -> "asyncio.Task":
    """A sub-request's task, in a context of its own.

    Concurrent calls from one request to one stage must not share a request context: Serve's router keys
    requests pending assignment by the caller's request id, so the second of two such calls was never
    assigned (a list of prompts hung). The sub-requests' own code cancels what they started."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class _Prepared(NamedTuple):
    """A request admitted and tokenized, ready to run (`OpenAIService._run`'s arguments)."""

    req: GenerationRequest
    principal: Any
    backend: Backend
    ticket: Any
    t0: float
    trace: dict


def merge_responses(bodies: list[dict]) -> dict:
    """Whole responses of a list of prompts' sub-requests as one: their choices in order, their usage summed."""
    merged = dict(bodies[0])
    merged["choices"] = [c for b in bodies for c in b["choices"]]
    merged["usage"] = sum((Usage.from_dict(b["usage"]) for b in bodies), Usage(0, 0)).to_dict()
    return merged


class MergedStream:
    """The SSE pieces of a list of prompts' sub-streams as they come, with one usage chunk and [DONE] at the end.

    Each sub-stream is a `MeteredStream` (settled on its own); their last pieces (usage and [DONE]) are held
    back and summed. Pieces carry the completion tokens sent so far over every sub-stream. Closing this
    closes every sub-stream; a sub-stream's error ends it (the others are closed).
    """

    def __init__(self, streams: list["MeteredStream"], end: Callable[[Usage], str]):
        self._streams = streams
        self._end = end
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] | None = None
        self._live = len(streams)
        self._sent = [0] * len(streams)
        self._usage = Usage(0, 0)
        self._done = False

    def __aiter__(self) -> "MergedStream":
        return self

    async def __anext__(self) -> SSEPiece:
        if self._done:
            raise StopAsyncIteration
        if self._tasks is None:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        while True:
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            if item is None:
                self._live -= 1
                if self._live == 0:
                    self._done = True
                    return self._end(self._usage), self._usage.to_dict()
                continue
            text, mark = item
            if isinstance(mark, dict):  # a sub-stream's end: its usage counts, its [DONE] does not go out
                self._usage = self._usage + Usage.from_dict(mark)
                continue
            self._sent[i] = mark
            return text, sum(self._sent)

    async def _pump(self, i: int, stream: "MeteredStream") -> None:
        try:
            async for item in stream:
                self._queue.put_nowait((i, item))
            self._queue.put_nowait((i, None))
        except Exception as exc:
            self._queue.put_nowait((i, exc))

    async def aclose(self) -> None:
        self._done = True
        for task in self._tasks or ():
            task.cancel()
        await asyncio.gather(*(self._tasks or ()), return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()


def check_limits(body: ChatCompletionRequest | CompletionRequest, limits: RequestLimits) -> None:
    """The deployment's bounds on one request (a 400 naming the parameter), before any other stage is called."""
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > limits.max_messages:
            raise InvalidRequestError(f"At most {limits.max_messages} messages are allowed; got {len(body.messages)}.", param="messages")
        size, param = sum(len(m.text()) for m in body.messages), "messages"
    else:
        if body.max_tokens == 0 and not body.echo:  # here, not in the model, so that the 400 names the parameter
            raise InvalidRequestError("max_tokens must be at least 1; 0 is allowed only with echo, to score the prompt without a completion.", param="max_tokens")
        size, param = sum(len(p) for p in body.prompts), "prompt"
    if size > limits.max_prompt_chars:
        raise InvalidRequestError(f"The prompt is {size} characters; at most {limits.max_prompt_chars} are allowed.", param=param)
    stops = body.stop_list
    if len(stops) > limits.max_stop_sequences:
        raise InvalidRequestError(f"At most {limits.max_stop_sequences} stop sequences are allowed; got {len(stops)}.", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise InvalidRequestError(f"A stop sequence may be at most {limits.max_stop_chars} characters.", param="stop")
    if (body.engine_logprobs or 0) > limits.max_logprobs:
        param = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
        raise InvalidRequestError(f"At most {limits.max_logprobs} top logprobs are allowed; got {body.engine_logprobs}.", param=param)
    if body.response_format is not None and not limits.structured_outputs:
        raise InvalidRequestError("This deployment does not enforce response formats (engine.structured_outputs is off).", param="response_format")


class _Meter:
    """Ends one request exactly once: settles its billing ticket, reports its record, writes its log line."""

    def __init__(self, billing: BillingGate | None, ticket: Any, prompt_tokens: int, observer: RequestObserver | None, base: dict, t0: float, trace: dict | None = None):
        self._billing, self._ticket, self._prompt = billing, ticket, prompt_tokens
        self._observer, self._base, self._t0 = observer, base, t0
        self._trace = trace
        self._first: float | None = None
        self._ended = False

    def mark(self, name: str) -> None:
        if self._trace is not None:
            self._trace[name] = time.time()

    def first_piece(self) -> None:
        if self._first is None:
            self._first = time.monotonic()
            self.mark("ingress_first_piece")

    def _end(self, completion_tokens: int | None, status: str, delivered: int = 0, cached: int = 0) -> None:
        if self._billing is not None and self._ticket is not None:
            self._billing.settle(self._ticket, self._prompt, completion_tokens, status, delivered, cached)
            self._ticket = None
        if self._ended:
            return
        self._ended = True
        now = time.monotonic()
        ttft = self._first - self._t0 if self._first is not None else None
        itl = (now - self._first) / (completion_tokens - 1) if self._first is not None and completion_tokens and completion_tokens > 1 and self._base["stream"] else None
        record = RequestRecord(**self._base, status=status, completion_tokens=completion_tokens, ttft_s=ttft, itl_s=itl, duration_s=now - self._t0)
        logger.info(
            "request %s", status,
            extra={**{k: getattr(record, k) for k in ("request_id", "tenant", "model", "version", "kind", "stream", "status", "prompt_tokens", "completion_tokens", "ttft_s", "duration_s")}, "trace": self._trace},
        )
        if self._observer is not None:
            self._observer.finished(record)

    def embedded(self, prompt_tokens: int) -> None:
        """An embedding request answered: its input's true token count (it was reserved by a bound)."""
        self._prompt = self._base["prompt_tokens"] = prompt_tokens
        self._end(0, "ok")

    def done(self, usage: dict) -> None:
        """The request's usage as its response carried it (`Usage.to_dict`)."""
        u = Usage.from_dict(usage)
        self._end(u.completion_tokens, "ok", cached=u.cached_tokens)

    def aborted(self, delivered: int = 0) -> None:
        self._end(None, "aborted", delivered)  # the generator reports what the engine produced; `delivered` is the floor

    def failed(self, exc: BaseException, delivered: int = 0) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            return self.aborted(delivered)
        err = as_maas_error(exc)
        # A client error was raised before any token was generated; otherwise the engine's count follows.
        self._end(0 if err is not None and err.status_code < 500 else None, (err.code or err.error_type) if err is not None else "internal_error", delivered)


class MeteredStream:
    """One admitted request's SSE pieces, settled exactly once however the stream ends.

    It ends finished (the last piece carries usage), failed (the upstream raised), or closed: by a client
    that left mid-stream, or before the first piece was ever read (an async generator's `finally` would
    never run then, leaving the reservation held and the request unbilled). `aclose()` settles and cancels
    the stages behind at once; garbage collection settles a stream nobody closed.  Once the final piece
    (the only one with usage) is out, the response is complete: a client that closes the connection right
    after `[DONE]` ends only the stream's teardown, not the request.
    """

    def __init__(self, first: SSEPiece, rest: SSEStream, meter: _Meter):
        self._first: SSEPiece | None = first
        self._rest = rest
        self._meter = meter
        self._usage: dict | None = piece_usage(first)
        self._delivered = 0  # completion tokens in the pieces handed on: the floor billed if the stream is cut
        self._ended = False

    def __aiter__(self) -> "MeteredStream":
        return self

    async def __anext__(self) -> SSEPiece:
        if self._first is not None:
            item, self._first = self._first, None
            return self._handed_on(item)
        try:
            item = await self._rest.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        return self._handed_on(item)

    def _handed_on(self, item: SSEPiece) -> SSEPiece:
        """Note what a piece going to the client says: the tokens sent so far, or (the last one) the usage."""
        if isinstance(item[1], int):
            self._delivered = item[1]
        self._usage = piece_usage(item) or self._usage
        return item

    def _end(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._usage is not None:
            self._meter.done(self._usage)
        elif exc is not None:
            self._meter.failed(exc, self._delivered)
        else:
            self._meter.aborted(self._delivered)  # closed early: the generator reports what the engine produced

    async def aclose(self) -> None:
        self._end(None)
        await self._rest.aclose()  # type: ignore[attr-defined]  # cancel the postprocessor and generator now

    def __del__(self) -> None:
        try:
            self._end(None)
        except Exception:  # interpreter shutdown: logging or billing may be gone already
            pass
