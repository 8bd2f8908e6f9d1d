"""Errors with structured fields, raised in plain code and rendered once, at the ingress, as the OpenAI envelope.

Each error knows its HTTP status and the OpenAI `type` / `code` / `param`, so the
code that detects a problem says exactly what the client will see.
"""

from __future__ import annotations

from typing import Any


class MaasError(Exception):
    """Base of every error a client may see."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_envelope(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # keep structured fields across Ray's pickling
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))


def _rebuild(cls: type[MaasError], message: str, param: str | None, code: str | None, headers: dict[str, str]) -> MaasError:
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequestError(MaasError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ModelNotFoundError(MaasError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFoundError(MaasError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class PayloadTooLargeError(MaasError):
    """413: a request body over the ingress's limit, refused before it is read whole."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class ServiceUnavailableError(MaasError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


class EngineNotReadyError(ServiceUnavailableError):
    default_code = "engine_starting"

    def __init__(self, message: str = "The model is still loading; retry shortly.", **kwargs: Any):
        kwargs.setdefault("headers", {"Retry-After": "5"})
        super().__init__(message, **kwargs)


class AuthenticationError(MaasError):
    """401: missing, unknown, revoked or expired API key."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(MaasError):
    """403: a valid key that may not do this (e.g. a tenant key on /admin)."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class RateLimitError(MaasError):
    """429 over requests- or tokens-per-minute; `error_type` is `requests` or `tokens` as in OpenAI's API."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_type: str = "requests", retry_after_s: float = 1.0, **kwargs: Any):
        kwargs.setdefault("headers", {"Retry-After": str(max(1, int(retry_after_s + 0.999)))})
        super().__init__(message, **kwargs)
        self.error_type = limit_type

    def __reduce__(self):
        return (_rebuild_rate, (self.message, self.error_type, self.param, self.code, self.headers))


def _rebuild_rate(message: str, limit_type: str, param: str | None, code: str | None, headers: dict[str, str]) -> "RateLimitError":
    return RateLimitError(message, limit_type=limit_type, param=param, code=code, headers=headers)


class InsufficientQuotaError(MaasError):
    """429 `insufficient_quota`: the tenant's monthly budget is spent (OpenAI's shape)."""

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class InternalError(MaasError):
    status_code = 500
    error_type = "internal_error"
    default_code = "internal_error"


def as_maas_error(exc: BaseException) -> MaasError | None:
    """The MaasError behind `exc`, also when it crossed a Ray hop (which wraps it, keeping `.cause`)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, MaasError) and hasattr(exc, "message"):
            return exc
        exc = getattr(exc, "cause", None)  # type: ignore[assignment]
        seen += 1
    return None
