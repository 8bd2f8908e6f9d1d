"""HTTP routes of the OpenAI-compatible API, and the one place where errors become the OpenAI envelope.

`build_app(service)` is a plain FastAPI factory: the Serve ingress calls it at
replica start-up, and unit tests call it with a service over in-process fakes.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.core import shapes
from deployments.core.errors import EngineNotReadyError, InternalError, InvalidRequestError, MaasError, NotFoundError, as_maas_error
from deployments.openai.protocol import ChatCompletionRequest, CompletionRequest
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


async def _respond(call: Awaitable[dict | SSEStream]) -> Any:
    """A whole JSON body, an SSE stream, or the error envelope: the one exit of both completion routes."""
    try:
        result = await call
    except Exception as exc:
        return error_response(exc)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_sse_body(result), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(service: OpenAIService) -> FastAPI:
    app = FastAPI(title="ray-maas", summary="OpenAI-compatible API served by ray-maas")

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

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not service.ready():
            return error_response(EngineNotReadyError())
        return JSONResponse({"status": "ok", "model": service.model_name})

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(service.models())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await _respond(service.chat(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _respond(service.completion(body))

    return app
