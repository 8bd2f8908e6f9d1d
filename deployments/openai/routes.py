"""HTTP routes of the OpenAI-compatible API, and the one place where errors become the OpenAI envelope.

`build_app(service)` is a plain FastAPI factory: the Serve ingress calls it at
replica start-up, and unit tests call it with a service over in-process fakes.

Closed by default: every route declares who may call it (`PUBLIC`, `TENANT` or `ADMIN`, in its
`openapi_extra`, so the OpenAPI schema shows it too). `Gate`, in front of every route, finds the
route a request is for the way the router will (so a Serve `route_prefix`, which moves into
`root_path`, changes nothing) and checks the key it declares before a byte of the body is read;
an undeclared route needs an admin key, and a path no route has is a 404 with its body unread. It then reads the body
itself up to the size limit (413 past it), so a caller without a key cannot make the ingress read
or parse anything. An upload route's body is not buffered here: it is counted as it streams to
the multipart parser (which spools it to disk) and refused with 413 at the limit.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Sequence

from enum import Enum

import msgspec
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from common.config import MaasConfig
from common.errors import EngineNotReadyError, InternalError, InvalidRequestError, MaasError, NotFoundError, PayloadTooLargeError, as_maas_error
from deployments.core import shapes
from deployments.openai.accounts import AccountsService
from deployments.openai.files import FilesService
from deployments.openai.fine_tuning import FineTuningService
from deployments.openai.operations import OperationsService
from deployments.openai.batches import BatchesService
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest, CreateBatchRequest, EmbeddingRequest, CreateFineTuningJobRequest, CreateKeyRequest, KeyPolicyFields, TrafficChange, UpdateKeyRequest
from deployments.openai.service import OpenAIService, RunAs, SSEStream

logger = logging.getLogger(__name__)


CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
# Only this server's own script, styles and API; no framing; nothing leaks the page's address.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class Access(str, Enum):
    """Who may call a route: every route of the app declares one (`tests/unit/test_routes.py` walks them)."""

    PUBLIC = "public"  # no key: health, the console's static files, the OpenAPI schema and its pages
    TENANT = "tenant"  # any valid key
    ADMIN = "admin"  # an admin key


ACCESS = "x-maas-access"  # the declaration's key in a route's `openapi_extra`
UPLOAD = "x-maas-upload"  # the route takes a file: its body streams (up to `max_file_bytes`) instead of being buffered
ADMIT = "x-maas-admit"  # the route changes state: the call takes a request slot of the caller's rate limits first


def declare(access: Access, upload: bool = False, admit: bool = False) -> dict[str, Any]:
    """A route's `openapi_extra`: who may call it, and how the Gate treats its body and its rate."""
    return {ACCESS: access.value, **({UPLOAD: True} if upload else {}), **({ADMIT: True} if admit else {})}


PUBLIC, TENANT, ADMIN = declare(Access.PUBLIC), declare(Access.TENANT), declare(Access.ADMIN)
WRITE, ADMIN_WRITE = declare(Access.TENANT, admit=True), declare(Access.ADMIN, admit=True)


def route_declaration(route: BaseRoute) -> dict[str, Any] | None:
    """What a route declared (None: nothing, which the Gate treats as admin-only)."""
    extra = getattr(route, "openapi_extra", None) or {}
    return extra if extra.get(ACCESS) in {a.value for a in Access} else None


def error_of(exc: BaseException) -> MaasError:
    """Any exception as the error a client is shown. Unknown exceptions are logged here and never shown."""
    err = as_maas_error(exc)
    if err is None:
        logger.error("Unhandled error while serving a request", exc_info=exc)
        err = InternalError("The server had an error while processing your request.")
    return err


def error_response(exc: BaseException) -> JSONResponse:
    """Any exception → (status, OpenAI envelope)."""
    err = error_of(exc)
    return JSONResponse(err.to_envelope(), status_code=err.status_code, headers=err.headers)


BATCH_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest, "/v1/embeddings": EmbeddingRequest}


async def run_batch_line(service: OpenAIService, principal: Any, url: str, body: dict, request_id: str) -> tuple[int, dict]:
    """One line of a batch as the request it holds, run at the batch tier under its fixed request id: (status, the
    response body or the error envelope), exactly what the route would have answered."""
    try:
        try:
            parsed: Any = BATCH_BODIES[url].model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        run = {"/v1/chat/completions": service.chat, "/v1/completions": service.completion, "/v1/embeddings": service.embed}[url]
        result = await run(parsed, principal, RunAs(request_id))
        if not isinstance(result, dict):  # refused at upload; never streamed
            await result.aclose()  # type: ignore[attr-defined]
            raise InvalidRequestError("A batch line cannot stream.", param="stream")
        return 200, result
    except Exception as exc:
        err = error_of(exc)
        return err.status_code, err.to_envelope()


UNKNOWN_ROUTE = "Unknown route. The API lives under /v1 (see /docs)."

# Codes for the errors Starlette/FastAPI raise themselves (never the bare status number as a code).
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


class Gate:
    """ASGI middleware: the key before the body, and the body's size before it is parsed.

    The route's declaration (`route_declaration`) says which key it needs: none, any valid key (the
    caller's key record is left in `scope["state"]["principal"]` for the routes) or an admin key. Then
    the body is read here, refused with 413 as soon as it passes `max_body_bytes` (by its Content-Length,
    or by counting a body sent without one), and replayed to the app whole; an upload route's body is
    counted as it streams instead, up to `max_file_bytes`.
    """

    def __init__(self, app: Any, service: OpenAIService, router: Any, max_body_bytes: int, max_file_bytes: int | None = None):
        self.app = app
        self._service = service
        self._router = router
        self._max = max_body_bytes
        self._max_file = max(max_file_bytes or max_body_bytes, max_body_bytes)  # an upload to /v1/files (a dataset)

    def declaration(self, scope: Any) -> dict[str, Any] | None:
        """The declaration of the route the router will pick for this request (None: no route has this path)."""
        partial = None
        for route in self._router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route_declaration(route) or ADMIN
            if match == Match.PARTIAL and partial is None:
                partial = route  # the path matches, the method does not: a 405 from that route
        if partial is not None:
            return route_declaration(partial) or ADMIN
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = self.declaration(scope)
        if declared is None:  # no route: a 404 at once, the body unread
            return await error_response(NotFoundError(UNKNOWN_ROUTE))(scope, receive, send)
        try:
            if declared[ACCESS] != Access.PUBLIC:
                authorization = _header(scope, b"authorization")
                check = self._service.require_admin if declared[ACCESS] == Access.ADMIN else self._service.authenticate
                principal = scope.setdefault("state", {})["principal"] = await check(authorization)
                if principal is not None:
                    send = self._with_rate_headers(send, principal)
                    if declared.get(ADMIT):
                        await self._service.admit_call(principal)
            if declared.get(UPLOAD):
                counted, body = self._counted(scope, receive), b""
            else:
                counted, body = None, await self._read_body(scope, receive)
        except Exception as exc:
            return await error_response(exc)(scope, receive, send)
        if counted is not None:  # the body streams to the app's parser (its errors are the app's to answer)
            return await self.app(scope, counted, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            try:
                return await receive()  # after the body: a disconnect, when the client leaves
            except Exception:  # Serve's proxy cancelled the request's receive stream: the client is gone
                return {"type": "http.disconnect"}

        await self.app(scope, replay, send)

    def _with_rate_headers(self, send: Any, principal: Any) -> Any:
        """`send` adding the tenant's `x-ratelimit-*` headers to the response, as they stand when it starts (after admission)."""

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._service.rate_headers(principal).items()]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_headers

    def _too_large(self, limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"The request body is larger than this server's limit of {limit} bytes.")

    async def _read_body(self, scope: Any, receive: Any) -> bytes:
        limit = self._max
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self._too_large(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError()  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _counted(self, scope: Any, receive: Any) -> Any:
        """`receive` for an upload: the body passes through as it comes, and past `max_file_bytes` the parser gets a 413."""
        limit = self._max_file
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self._too_large(limit)
        size = 0

        async def receive_counted() -> dict:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:  # FastAPI passes its own HTTPException through the form parser (any other error is a 400)
                raise HTTPException(413, detail=self._too_large(limit).message)
            return message

        return receive_counted


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _validation_error(exc: RequestValidationError | ValidationError) -> MaasError:
    """FastAPI's 422 → OpenAI's 400, naming the first offending parameter."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.")
    extra = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if extra is not None:
        name = ".".join(str(p) for p in extra.get("loc", ()) if p != "body")
        return InvalidRequestError(f"Unsupported parameter: `{name}` is not implemented by this API.", param=name, code="unsupported_parameter")
    by_path: dict[tuple[str, ...], list[str]] = {}  # a union's branches fail at one path: one entry, its reasons joined by "or"
    for e in errors:
        reasons = by_path.setdefault(_param_path(e.get("loc", ())), [])
        if (msg := e.get("msg", "invalid value")) not in reasons:
            reasons.append(msg)
    message = "; ".join(f"{'.'.join(path) or 'body'}: {' or '.join(reasons)}" for path, reasons in list(by_path.items())[:5])
    first = next(iter(by_path), ())
    return InvalidRequestError(message or "Invalid request.", param=first[0] if first else None)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _param_path(loc: Sequence[Any]) -> tuple[str, ...]:
    """The parameter's path in the body: pydantic's union-branch tags (`constrained-int`, `literal['auto']`, `list[str]`, `str`) dropped."""
    return tuple(str(p) for p in loc if p != "body" and (isinstance(p, int) or (str(p).isidentifier() and str(p) not in _UNION_TAGS)))


async def _sse_body(stream: SSEStream) -> AsyncIterator[str]:
    try:
        async for text, _usage in stream:
            yield text
    except Exception as exc:  # headers are sent: report the error in-band, never a traceback
        err = as_maas_error(exc)
        if err is None:
            logger.error("Error in the middle of a stream", exc_info=exc)
            err = InternalError("The server had an error while streaming the response.")
        yield shapes.sse_error(err.to_envelope())


class _ClosingStreamingResponse(StreamingResponse):
    """An SSE response that closes its stream however the response ends, started or not.

    Starlette leaves the body iterator to the garbage collector when the client goes away
    (the send fails or the task is cancelled), and an async generator that never started
    runs no `finally`; closing the stream itself here settles the request's usage and
    cancels the stages behind it at once.
    """

    def __init__(self, stream: SSEStream, **kwargs: Any):
        super().__init__(_sse_body(stream), media_type="text/event-stream", **kwargs)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._stream.aclose()  # type: ignore[attr-defined]


async def _respond(call: Awaitable[dict | SSEStream]) -> Any:
    """A whole JSON body, an SSE stream, or the error envelope: the one exit of both completion routes."""
    try:
        result = await call
    except Exception as exc:
        return error_response(exc)
    if isinstance(result, dict):
        return JSONResponse(result)
    return _ClosingStreamingResponse(result, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class FastJSONResponse(JSONResponse):
    """JSON rendered by msgspec, in C: for large bodies of numbers (embeddings: 8 vectors of 384 floats take 2-4 ms
    with `json.dumps`, 0.3 ms here)."""

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


async def _json(call: Awaitable[Any], response: type[JSONResponse] = JSONResponse) -> JSONResponse:
    try:
        return response(await call)
    except Exception as exc:
        return error_response(exc)


def build_app(
    service: OpenAIService,
    accounts: AccountsService | None = None,
    max_body_bytes: int | None = None,
    operations: OperationsService | None = None,
    files: FilesService | None = None,
    max_file_bytes: int | None = None,
    fine_tuning: FineTuningService | None = None,
    batches: BatchesService | None = None,
) -> FastAPI:
    app = FastAPI(title="ray-maas", summary="OpenAI-compatible API served by ray-maas")
    builtin = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    for route in app.router.routes:  # FastAPI's own routes: the OpenAPI schema and its pages are public
        if getattr(route, "path", None) in builtin:
            route.openapi_extra = PUBLIC  # type: ignore[attr-defined]
    limits = MaasConfig().request_limits()
    app.add_middleware(Gate, service=service, router=app.router, max_body_bytes=max_body_bytes or limits.max_body_bytes, max_file_bytes=max_file_bytes or limits.max_file_bytes)

    async def principal(request: Request) -> Any:
        """The caller's key, checked by the Gate before the body was read; None when billing is off."""
        return request.scope.get("state", {}).get("principal")

    admin = principal  # the Gate required an admin key for /admin/*

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(UNKNOWN_ROUTE))
        err = MaasError(str(exc.detail), code=_HTTP_CODES.get(exc.status_code))
        err.status_code, err.error_type = exc.status_code, "invalid_request_error"
        return error_response(err)

    @app.exception_handler(MaasError)  # e.g. a 401 raised by the key dependency
    async def _on_maas_error(_: Request, exc: MaasError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.get("/console", include_in_schema=False, openapi_extra=PUBLIC)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("console/", status_code=308)  # relative: right under any route prefix

    @app.get("/console/", include_in_schema=False, openapi_extra=PUBLIC)
    @app.get("/console/{name}", include_in_schema=False, openapi_extra=PUBLIC)
    async def console(name: str = "index.html") -> Response:
        """The web console: three static files over this API (the key stays in the browser's session storage)."""
        if name not in CONSOLE_FILES:
            return error_response(NotFoundError("Unknown console file."))
        return Response((CONSOLE_DIR / name).read_bytes(), media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS)

    @app.get("/healthz", openapi_extra=PUBLIC)
    async def healthz() -> JSONResponse:
        if not service.ready():
            return error_response(EngineNotReadyError())
        return JSONResponse({"status": "ok", "model": service.model_name})

    @app.get("/v1/models", openapi_extra=TENANT)
    async def list_models(who: Any = Depends(principal)) -> JSONResponse:
        return JSONResponse(service.models(who))

    @app.post("/v1/chat/completions", openapi_extra=TENANT)
    async def chat_completions(body: ChatCompletionRequest, who: Any = Depends(principal)) -> Any:
        return await _respond(service.chat(body, who))

    @app.post("/v1/completions", openapi_extra=TENANT)
    async def completions(body: CompletionRequest, who: Any = Depends(principal)) -> Any:
        return await _respond(service.completion(body, who))

    @app.post("/v1/embeddings", openapi_extra=TENANT)
    async def create_embeddings(body: EmbeddingRequest, who: Any = Depends(principal)) -> JSONResponse:
        """A vector per input from an embedding model of the catalogue (`/v1/models` says which can embed)."""
        return await _json(service.embed(body, who), FastJSONResponse)

    if files is not None:

        @app.post("/v1/files", openapi_extra=declare(Access.TENANT, upload=True, admit=True))
        async def create_file(file: UploadFile = File(..., description="A JSONL chat dataset."), purpose: str = Form(..., max_length=64), who: Any = Depends(principal)) -> JSONResponse:
            """Upload a fine-tuning dataset (checked whole: every line a chat example, errors name the line)."""
            return await _json(files.create(who, file.filename or "", purpose, file.file))  # spooled to disk by the parser

        @app.get("/v1/files", openapi_extra=TENANT)
        async def list_files(who: Any = Depends(principal), purpose: str | None = Query(None, max_length=64)) -> JSONResponse:
            return await _json(files.list(who, purpose))

        @app.get("/v1/files/{file_id}", openapi_extra=TENANT)
        async def get_file(file_id: str, who: Any = Depends(principal)) -> JSONResponse:
            return await _json(files.get(who, file_id))

        @app.get("/v1/files/{file_id}/content", openapi_extra=TENANT)
        async def file_content(file_id: str, who: Any = Depends(principal)) -> Response:
            try:
                return Response(await files.content(who, file_id), media_type="application/jsonl")
            except Exception as exc:
                return error_response(exc)

        @app.delete("/v1/files/{file_id}", openapi_extra=WRITE)
        async def delete_file(file_id: str, who: Any = Depends(principal)) -> JSONResponse:
            return await _json(files.delete(who, file_id))

    if batches is not None:

        @app.post("/v1/batches", openapi_extra=WRITE)
        async def create_batch(body: CreateBatchRequest, who: Any = Depends(principal)) -> JSONResponse:
            """Run every request of an uploaded file (`purpose=batch`) at the batch tier and price: after live traffic, within 24 h."""
            return await _json(batches.create(who, body))

        @app.get("/v1/batches", openapi_extra=TENANT)
        async def list_batches(who: Any = Depends(principal), after: str | None = Query(None, max_length=64), limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
            return await _json(batches.list(who, after, limit))

        @app.get("/v1/batches/{batch_id}", openapi_extra=TENANT)
        async def get_batch(batch_id: str, who: Any = Depends(principal)) -> JSONResponse:
            return await _json(batches.get(who, batch_id))

        @app.post("/v1/batches/{batch_id}/cancel", openapi_extra=WRITE)
        async def cancel_batch(batch_id: str, who: Any = Depends(principal)) -> JSONResponse:
            """Stop starting its lines; the running ones finish and are billed, then it is `cancelled` with their results."""
            return await _json(batches.cancel(who, batch_id))

    if fine_tuning is not None:

        @app.post("/v1/fine_tuning/jobs", openapi_extra=WRITE)
        async def create_fine_tuning_job(body: CreateFineTuningJobRequest, who: Any = Depends(principal)) -> JSONResponse:
            """Start fine-tuning the served model on an uploaded file (LoRA by default): queued until the cluster has room."""
            return await _json(fine_tuning.create(who, body))

        @app.get("/v1/fine_tuning/jobs", openapi_extra=TENANT)
        async def list_fine_tuning_jobs(who: Any = Depends(principal), after: str | None = Query(None, max_length=64), limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
            return await _json(fine_tuning.list(who, after, limit))

        @app.get("/v1/fine_tuning/jobs/{job_id}", openapi_extra=TENANT)
        async def get_fine_tuning_job(job_id: str, who: Any = Depends(principal)) -> JSONResponse:
            return await _json(fine_tuning.get(who, job_id))

        @app.get("/v1/fine_tuning/jobs/{job_id}/events", openapi_extra=TENANT)
        async def fine_tuning_events(
            job_id: str, who: Any = Depends(principal), after: str | None = Query(None, max_length=64), limit: int = Query(20, ge=1, le=1000)
        ) -> JSONResponse:
            """The job's messages and metrics (loss per step, held-out loss), newest first."""
            return await _json(fine_tuning.events(who, job_id, after, limit))

        @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", openapi_extra=TENANT)
        async def fine_tuning_checkpoints(job_id: str, who: Any = Depends(principal), after: str | None = Query(None, max_length=64), limit: int = Query(10, ge=1, le=100)) -> JSONResponse:
            return await _json(fine_tuning.checkpoints(who, job_id, limit))

        @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", openapi_extra=WRITE)
        async def cancel_fine_tuning_job(job_id: str, who: Any = Depends(principal)) -> JSONResponse:
            """Stop the job: a queued one is never billed, a running one is billed for the tokens it trained."""
            return await _json(fine_tuning.cancel(who, job_id))

    if accounts is None:
        return app

    @app.get("/v1/usage", openapi_extra=TENANT)
    async def usage(
        who: Any = Depends(principal), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None, by_user: bool = False
    ) -> JSONResponse:
        """The caller's tenant's usage this month (or `period`), by day, model and version; `by_user` also by the requests' `user`."""
        return await _json(accounts.tenant_usage(who, period, tenant, by_user))

    @app.get("/v1/account", openapi_extra=TENANT)
    async def account(who: Any = Depends(principal)) -> JSONResponse:
        """The caller's tenant: its plan, budget, what it spent this month and what remains, its rate limits."""
        return await _json(accounts.account(who))

    @app.get("/v1/keys", openapi_extra=TENANT)
    async def own_keys(who: Any = Depends(principal)) -> JSONResponse:
        """The caller's tenant's keys (ids, names, policies; never a secret)."""
        return await _json(accounts.own_keys(who))

    @app.post("/v1/keys", openapi_extra=WRITE)
    async def create_own_key(body: KeyPolicyFields, who: Any = Depends(principal)) -> JSONResponse:
        """A new key of the caller's tenant, shown once (a key with a policy of its own may not do this)."""
        return await _json(accounts.create_own_key(who, body.name, body.expires_in_s, body.policy()))

    @app.post("/v1/keys/{key_id}", openapi_extra=WRITE)
    async def update_own_key(key_id: str, body: UpdateKeyRequest, who: Any = Depends(principal)) -> JSONResponse:
        """Change a key of the caller's tenant: its name, models or own limits (the fields sent; null clears one)."""
        return await _json(accounts.update_own_key(who, key_id, body.changes()))

    @app.post("/v1/keys/{key_id}/revoke", openapi_extra=WRITE)
    async def revoke_own_key(key_id: str, who: Any = Depends(principal)) -> JSONResponse:
        return await _json(accounts.revoke_own_key(who, key_id))

    @app.get("/admin/usage", openapi_extra=ADMIN)
    async def admin_usage(
        who: Any = Depends(admin), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None, by_user: bool = False
    ) -> JSONResponse:
        return await _json(accounts.usage(period, tenant, by_user))

    @app.get("/admin/invoice", openapi_extra=ADMIN)
    async def admin_invoice(who: Any = Depends(admin), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None) -> Any:
        try:
            return PlainTextResponse(await accounts.invoice(period, tenant), media_type="text/csv")
        except Exception as exc:
            return error_response(exc)

    @app.get("/admin/keys", openapi_extra=ADMIN)
    async def admin_keys(who: Any = Depends(admin), tenant: str | None = None) -> JSONResponse:
        return await _json(accounts.list_keys(tenant))

    @app.post("/admin/keys", openapi_extra=ADMIN)
    async def admin_create_key(body: CreateKeyRequest, who: Any = Depends(admin)) -> JSONResponse:
        return await _json(accounts.create_key(who, body.tenant, body.plan, body.role, body.expires_in_s, body.name, body.policy()))

    @app.post("/admin/keys/{key_id}", openapi_extra=ADMIN)
    async def admin_update_key(key_id: str, body: UpdateKeyRequest, who: Any = Depends(admin)) -> JSONResponse:
        """Change any key: its name, models or own limits (the fields sent; null clears one)."""
        return await _json(accounts.update_key(who.key_id, key_id, body.changes()))

    @app.post("/admin/keys/{key_id}/revoke", openapi_extra=ADMIN)
    async def admin_revoke_key(key_id: str, who: Any = Depends(admin)) -> JSONResponse:
        return await _json(accounts.revoke_key(who.key_id, key_id))

    @app.get("/admin/alerts", openapi_extra=ADMIN)
    async def admin_alerts(who: Any = Depends(admin), tenant: str | None = None) -> JSONResponse:
        return await _json(accounts.alerts(tenant))

    @app.get("/admin/audit", openapi_extra=ADMIN)
    async def admin_audit(
        who: Any = Depends(admin),
        limit: int = Query(100, ge=1, le=10000),
        action: str | None = Query(None, max_length=64, description="A prefix of the action: `model.`, `key.`, `tenant.`, `alert.` ..."),
        actor: str | None = Query(None, max_length=128, description="Who acted (exactly)."),
        target: str | None = Query(None, max_length=256, description="What was acted on (exactly): a key id, a tenant, a model."),
        since: float | None = Query(None, ge=0, description="Entries at or after this Unix time."),
    ) -> JSONResponse:
        return await _json(accounts.audit(limit, action, actor, target, since))

    @app.get("/admin/tenants", openapi_extra=ADMIN)
    async def admin_tenants(who: Any = Depends(admin), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$")) -> JSONResponse:
        """Every tenant: plan, budget, limits, and this period's requests, tokens and spend (top spenders first)."""
        return await _json(accounts.tenants(period))

    if fine_tuning is not None:

        @app.get("/admin/fine_tuning/jobs", openapi_extra=ADMIN)
        async def admin_fine_tuning_jobs(who: Any = Depends(admin), after: str | None = Query(None, max_length=64), limit: int = Query(100, ge=1, le=1000)) -> JSONResponse:
            """Every tenant's fine-tuning jobs, newest first."""
            return await _json(fine_tuning.all_jobs(after, limit))

        @app.post("/admin/fine_tuning/jobs/{job_id}/cancel", openapi_extra=ADMIN)
        async def admin_cancel_fine_tuning_job(job_id: str, who: Any = Depends(admin)) -> JSONResponse:
            return await _json(fine_tuning.cancel_any(job_id))

    if operations is None:
        return app

    @app.get("/admin/traffic", openapi_extra=ADMIN)
    async def admin_traffic(who: Any = Depends(admin)) -> JSONResponse:
        """The live traffic plan of the served model and the store's versions of it."""
        return await _json(operations.traffic())

    @app.post("/admin/traffic", openapi_extra=ADMIN)
    async def admin_change_traffic(body: TrafficChange, who: Any = Depends(admin)) -> JSONResponse:
        """Canary, promote or roll back (as `maas models ...`); answers once the new plan is live."""
        return await _json(operations.change(who, body))

    @app.get("/admin/health", openapi_extra=ADMIN)
    async def admin_health(who: Any = Depends(admin)) -> JSONResponse:
        """Serve's status of every application, deployment and proxy."""
        return await _json(operations.health())

    return app
