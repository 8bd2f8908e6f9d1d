"""HTTP routes of the OpenAI-compatible API, and the one place where errors become the OpenAI envelope.

`build_app(service)` is a plain FastAPI factory: the Serve ingress calls it at
replica start-up, and unit tests call it with a service over in-process fakes.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import EngineNotReadyError, InternalError, InvalidRequestError, MaasError, NotFoundError, as_maas_error
from deployments.core import shapes
from deployments.openai.accounts import AccountsService
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest, CreateKeyRequest
from deployments.openai.service import OpenAIService, SSEStream

logger = logging.getLogger(__name__)


def error_response(exc: BaseException) -> JSONResponse:
    """Any exception → (status, OpenAI envelope). Unknown exceptions are logged here and never shown."""
    err = as_maas_error(exc)
    if err is None:
        logger.error("Unhandled error while serving a request", exc_info=exc)
        err = InternalError("The server had an error while processing your request.")
    return JSONResponse(err.to_envelope(), status_code=err.status_code, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> MaasError:
    """FastAPI's 422 → OpenAI's 400, naming the first offending parameter."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.")
    located = [([str(p) for p in e.get("loc", ()) if p != "body"], e.get("msg", "invalid value")) for e in errors]
    message = "; ".join(f"{'.'.join(loc) or 'body'}: {msg}" for loc, msg in located[:5])
    param = located[0][0][0] if located and located[0][0] else None
    return InvalidRequestError(message or "Invalid request.", param=param)


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


async def _json(call: Awaitable[Any]) -> JSONResponse:
    try:
        return JSONResponse(await call)
    except Exception as exc:
        return error_response(exc)


def build_app(service: OpenAIService, accounts: AccountsService | None = None) -> FastAPI:
    app = FastAPI(title="ray-maas", summary="OpenAI-compatible API served by ray-maas")

    async def principal(request: Request) -> Any:
        """The caller's key (401 without a valid one); None when billing is off."""
        return await service.authenticate(request.headers.get("authorization"))

    async def admin(request: Request) -> Any:
        return await service.require_admin(request.headers.get("authorization"))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError("Unknown route. The API lives under /v1 (see /docs)."))
        err = MaasError(str(exc.detail), code=str(exc.status_code))
        err.status_code, err.error_type = exc.status_code, "invalid_request_error"
        return error_response(err)

    @app.exception_handler(MaasError)  # e.g. a 401 raised by the key dependency
    async def _on_maas_error(_: Request, exc: MaasError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not service.ready():
            return error_response(EngineNotReadyError())
        return JSONResponse({"status": "ok", "model": service.model_name})

    @app.get("/v1/models")
    async def list_models(who: Any = Depends(principal)) -> JSONResponse:
        return JSONResponse(service.models())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, who: Any = Depends(principal)) -> Any:
        return await _respond(service.chat(body, who))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, who: Any = Depends(principal)) -> Any:
        return await _respond(service.completion(body, who))

    if accounts is None:
        return app

    @app.get("/v1/usage")
    async def usage(who: Any = Depends(principal), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None) -> JSONResponse:
        """The caller's tenant's usage this month (or `period`), by day, model and version."""
        return await _json(accounts.tenant_usage(who, period, tenant))

    @app.get("/admin/usage")
    async def admin_usage(who: Any = Depends(admin), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None) -> JSONResponse:
        return await _json(accounts.usage(period, tenant))

    @app.get("/admin/invoice")
    async def admin_invoice(who: Any = Depends(admin), period: str | None = Query(None, pattern=r"^\d{4}-\d{2}$"), tenant: str | None = None) -> Any:
        try:
            return PlainTextResponse(await accounts.invoice(period, tenant), media_type="text/csv")
        except Exception as exc:
            return error_response(exc)

    @app.get("/admin/keys")
    async def admin_keys(who: Any = Depends(admin), tenant: str | None = None) -> JSONResponse:
        return await _json(accounts.list_keys(tenant))

    @app.post("/admin/keys")
    async def admin_create_key(body: CreateKeyRequest, who: Any = Depends(admin)) -> JSONResponse:
        return await _json(accounts.create_key(who.key_id, body.tenant, body.plan, body.role, body.expires_in_s, body.name))

    @app.post("/admin/keys/{key_id}/revoke")
    async def admin_revoke_key(key_id: str, who: Any = Depends(admin)) -> JSONResponse:
        return await _json(accounts.revoke_key(who.key_id, key_id))

    @app.get("/admin/audit")
    async def admin_audit(who: Any = Depends(admin), limit: int = Query(100, ge=1, le=10000)) -> JSONResponse:
        return await _json(accounts.audit(limit))

    return app
