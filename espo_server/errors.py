"""The errors the service raises, the one envelope they are answered with, and the one mapper.

The service (and the sample loop, the ledger, the critic clients) raise these; they know nothing of
HTTP. `error_body` maps any exception to the envelope's body, for every transport: each HTTP app
(`app.py`, `critic_server.py`) installs `install_error_handlers`, which answers with
`{"error": {"message", "type", "param", "code"}}` (and Retry-After where `retry_after_s` says);
streams send the same body as their last event; gRPC turns its `code` into a status:

    ServiceError                 503 service_unavailable (the base: something on our side is down)
    +-- InvalidRequest           400 invalid_request_error, `param` names the field
    |   +-- ModelNotFound        404 not_found_error (OpenAI API: `model` is not the served one)
    +-- Forbidden                403 permission_error (e.g. weights outside --weights-dir)
    +-- NotFound                 404 not_found_error (an upload id this server does not hold)
    +-- Conflict                 409 conflict (a request_id reused with another body, a busy run, ...)
    +-- TooLarge                 413 payload_too_large (an upload over --upload-max-bytes)
    +-- Overloaded               429 overloaded, with Retry-After
    +-- EngineDead               503 engine_dead (the vLLM engine process died: the server exits)
    +-- ShuttingDown             503 shutting_down, with Retry-After (SIGTERM: draining)
    +-- ReloadFailed             500 reload_failed (a weight push failed; rolled back, old version serves)
    +-- WeightsBroken            503 weights_broken (a failed push whose roll-back failed too)
    +-- critic.CriticError       503 critic_unavailable
    pydantic ValidationError     400 invalid_request_error (pydantic's complaint, field named; FastAPI's
                                 RequestValidationError too)
    HTTPException(401)           401 authentication_error (404, 405, an undecodable body 400: http_error)
    anything else                503 engine_error (logged with its traceback, never a bare 500)
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from espo_client.protocol import ErrorBody, ErrorResponse
from espo_client.stop_rule import ParameterError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """An error with a status: subclasses say whose fault it is."""

    status: int = 503
    type: str = "service_unavailable"
    retry_after_s: float | None = None
    """Sent as the Retry-After header when set."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.status)


class InvalidRequest(ServiceError):
    """The caller's mistake: answered 400 with the offending field."""

    status = 400
    type = "invalid_request_error"


class Conflict(ServiceError):
    """The request is valid but clashes with the server's current state (409)."""

    status = 409
    type = "conflict"


class NotFound(ServiceError):
    """The request names something this server does not hold (404), e.g. an upload id."""

    status = 404
    type = "not_found_error"


class TooLarge(ServiceError):
    """The request is bigger than this server takes (413), e.g. an upload over its byte limit."""

    status = 413
    type = "payload_too_large"


class Forbidden(ServiceError):
    """Not allowed by the server's configuration (403), e.g. weights outside --weights-dir."""

    status = 403
    type = "permission_error"


class Overloaded(ServiceError):
    """Too much in flight (429): retry after `retry_after_s` (the Retry-After header)."""

    status = 429
    type = "overloaded"

    def __init__(self, message: str, param: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s


class ModelNotFound(InvalidRequest):
    """An OpenAI-style request names a model this server does not serve: 404, `param` "model"."""

    status = 404
    type = "not_found_error"


class EngineDead(ServiceError):
    """The policy engine's process is gone (vLLM's EngineDeadError). Unrecoverable: every /v1 call
    is answered with this 503 until the server has exited (non-zero) for its supervisor to restart."""

    type = "engine_dead"


class ShuttingDown(ServiceError):
    """The server is draining after SIGTERM: it takes no new work; a call still running when the
    grace ends is answered with this too. Retry (same request_id) on another replica or later."""

    type = "shutting_down"

    def __init__(self, message: str, param: str | None = None, retry_after_s: float = 5.0) -> None:
        super().__init__(message, param)
        self.retry_after_s = retry_after_s


def error_body(exc: BaseException) -> ErrorBody:
    """The envelope's body for any exception the service lets out: the one mapper, used by every
    transport (HTTP and OpenAI routes, their streams' error events, gRPC's status)."""
    if isinstance(exc, ServiceError):
        return exc.body()
    if isinstance(exc, ValidationError):  # a message converted to a protocol model (gRPC)
        return validation_body(exc.errors())
    return ErrorBody(message=f"engine error: {exc.__class__.__name__}: {exc}", type="engine_error", code=503)


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the caller should wait before retrying (HTTP's Retry-After), where the error says."""
    return exc.retry_after_s if isinstance(exc, ServiceError) else None


def validation_body(
    errors: Sequence[Mapping[str, Any]], rename: Callable[[str | None], str | None] | None = None
) -> ErrorBody:
    """pydantic's complaint (its first error, and how many more) as a 400 naming the field; `rename`
    maps the field's name to the caller's (the OpenAI routes' `prompt` for `prompts[0]`)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('msg')}"
        return ErrorBody(message=message, type="invalid_request_error", code=400)
    loc = tuple(first.get("loc", ()))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParameterError):  # raised by a dataclass's own check: name its field
        loc += (cause.field,)
    param = param_of(loc)
    if rename is not None:
        param = rename(param)
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return ErrorBody(message=message, type="invalid_request_error", param=param, code=400)


def param_of(loc: tuple) -> str | None:
    """pydantic's error location ('body', 'prompts', 0, 'text') -> 'prompts[0].text'."""
    out = ""
    for part in (str(p) for p in loc if p not in ("body", "query")):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def error_response(body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=body.code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception with the envelope: 4xx for the caller's mistakes, 503 for what is down."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    # Starlette's HTTPException, not FastAPI's subclass: FastAPI's body parser and router raise the
    # base class (an undecodable body 400, an unknown path 404, a wrong method 405).
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_body(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = "authentication_error" if exc.status_code == 401 else "http_error"
        body = ErrorBody(message=str(exc.detail), type=type_, code=exc.status_code)
        return error_response(body, exc.headers)  # e.g. Allow of a 405

    async def answer(_: Request, exc: Exception) -> JSONResponse:
        retry = retry_after_s(exc)
        return error_response(error_body(exc), None if retry is None else {"Retry-After": f"{retry:g}"})

    app.add_exception_handler(ServiceError, answer)
    # Anything else: Starlette's last resort, which also logs it with its traceback (and re-raises).
    app.add_exception_handler(Exception, answer)


class ReloadFailed(ServiceError):
    """A weight push failed inside the engine and was rolled back: the old version serves on."""

    status = 500
    type = "reload_failed"


class WeightsBroken(ServiceError):
    """A weight push failed and so did its roll-back: the weights are half-loaded; every call is
    refused with this 503 (and /readyz is 503) until a push succeeds."""

    type = "weights_broken"


def bearer_matches(authorization: str, api_key: str) -> bool:
    """Whether an `Authorization` header is `Bearer <api_key>`, compared in constant time (every
    transport's auth: both HTTP apps and gRPC)."""
    return hmac.compare_digest(authorization.encode(), f"Bearer {api_key}".encode())
