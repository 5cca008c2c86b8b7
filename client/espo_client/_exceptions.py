"""Exceptions raised by `EspoClient`, `AsyncEspoClient`, the replica clients (`espo_client.replicas`)
and the gRPC client (`espo_client.grpc_client`).

One base class, then a branch for "no answer" and a branch for "the server said no":

    EspoError                        base of everything a client call raises
    ├── TransportError               no HTTP response; raised `from` the httpx exception
    │   ├── ConnectError             never reached a server: refused, DNS, connect timeout   [retried]
    │   └── RequestTimeoutError      read / write / pool timeout: the server may still be working
    ├── APIStatusError               a 4xx/5xx answer: status_code, message, type, param, retry_after
    │   ├── BadRequestError          4xx: the caller's mistake (400 validation, 401, 403, 404, ...)
    │   │   └── ConflictError        409: clashes with the server's state (`param` says with what)
    │   ├── RateLimitError           429: too much in flight; retry after `retry_after` s   [retried]
    │   ├── ServiceUnavailableError  503: engine or critic down, not ready, draining        [retried]
    │   └── ServerError              any other 5xx
    ├── ResponseValidationError      a 2xx body that is not the protocol's model (client/server skew)
    ├── StreamError                  a streamed rollout failed after its 200: an error line, a bad
    │                                line, or a stream that ended without its done line
    └── BroadcastError               a call sent to every replica failed on some: which did it, which not

Only `ConnectError`, `RateLimitError` and `ServiceUnavailableError` are retried (up to `max_retries`
times in all, with jittered exponential backoff, waiting at least the server's `Retry-After` up to
`backoff_max`): none of them lets the server start the work twice. A rollout call keeps its
`request_id` across retries, so a server that did start it returns the first result instead of
sampling again; a rollout call's error carries that `request_id`, for a retry by the caller.

A 409 `ConflictError` is never retried: `param` names what clashed. `request_id`: the id was
already used for a call with another body (a new call needs a new id; a retry must resend the same
body). `run_id` or `batch_id`: that run or batch has a call in progress (retry once it has
returned). A weight push while another is in progress: retry once that one has finished.

The gRPC client raises the same classes (`grpc_client.GrpcStatusError` and its subclasses), with
`status_code` the HTTP status of the gRPC code (FAILED_PRECONDITION and ALREADY_EXISTS: 409,
RESOURCE_EXHAUSTED: 429, UNAVAILABLE: 503, ...), so `except ConflictError` works with either API.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

__all__ = [
    "APIStatusError",
    "BadRequestError",
    "BroadcastError",
    "ConflictError",
    "ConnectError",
    "EspoError",
    "RateLimitError",
    "RequestTimeoutError",
    "ResponseValidationError",
    "ServerError",
    "ServiceUnavailableError",
    "StreamError",
    "TransportError",
]


class EspoError(Exception):
    """Base class of every error an espo-client call raises.

    `request_id` is set on errors of a rollout call: the idempotency key it used. Retrying with
    `request_id=error.request_id` gets the server's first result if it did run the call.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.request_id: str | None = None


class TransportError(EspoError):
    """No HTTP response came back. `__cause__` is the httpx exception; `url` the request's URL."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ConnectError(TransportError):
    """The request never reached a server (connection refused, DNS failure, connect timeout)."""


class RequestTimeoutError(TransportError):
    """A read, write or pool timeout: the server may have started the work (not retried)."""


class APIStatusError(EspoError):
    """The server answered with a 4xx or 5xx status.

    `message`, `type`, `param` and `code` come from the error envelope
    `{"error": {"message", "type", "param", "code"}}` when the body is one, else from the raw body.
    `retry_after`: the seconds the server asked the client to wait (`Retry-After`), or None.
    `response` is the httpx response (None for a gRPC error, whose `status_code` is the HTTP status
    its gRPC code stands for).
    """

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response | None,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: Any = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        if status_code is None:
            if response is None:
                raise TypeError("APIStatusError needs a response or a status_code")
            status_code = response.status_code
        self.status_code = status_code
        self.response = response
        self.type = type
        self.param = param
        self.code = code if code is not None else status_code
        self.body = body
        self.retry_after = retry_after
        prefix = f"{status_code} {type}" if type else str(status_code)
        where = f" (param: {param})" if param else ""
        super().__init__(f"{prefix}: {message}{where}")
        self.message = message


class BadRequestError(APIStatusError):
    """A 4xx status: the request is wrong (validation, authentication, unknown batch, ...). Not retried."""


class ConflictError(BadRequestError):
    """A 409 status: the request is valid but clashes with the server's state. Not retried.

    `param` names what clashed: `request_id` (reused for a call with another body: a new call needs
    a new id), `run_id` / `batch_id` (a call of that run or batch is in progress: retry once it has
    returned), or the weights being pushed (another push is in progress: retry once it is done).
    """


class RateLimitError(APIStatusError):
    """A 429 status: the server has too much in flight (backpressure); nothing was started.

    Retried after the server's `Retry-After` (`retry_after`, at most `backoff_max`), within
    `max_retries`; raised once those are spent.
    """


class ServiceUnavailableError(APIStatusError):
    """A 503 status: the engine or the critic is down or not ready. Retried with backoff."""


class ServerError(APIStatusError):
    """A 5xx status other than 503. Not retried: the server may have done part of the work."""


RETRIED_STATUS_ERRORS: tuple[type[APIStatusError], ...] = (RateLimitError, ServiceUnavailableError)
"""The status errors a client retries (on every transport): nothing was started, try again later."""


def status_error_class(status: int) -> type[APIStatusError]:
    """The exception class of an HTTP status (also of a gRPC code's HTTP equivalent)."""
    if status == 409:
        return ConflictError
    if status == 429:
        return RateLimitError
    if status == 503:
        return ServiceUnavailableError
    if 400 <= status < 500:
        return BadRequestError
    if status >= 500:
        return ServerError
    return APIStatusError


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` value in seconds; None if absent, negative or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:  # an HTTP date: the client keeps its own backoff
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class ResponseValidationError(EspoError):
    """A 2xx body that does not parse as the protocol's model; `__cause__` is pydantic's error."""


class StreamError(EspoError):
    """A streamed rollout failed after the server had sent its 200 status.

    For an `{"type": "error", "error": {...}}` line, `type`, `param` and `code` are the envelope's
    (`code` is the HTTP status the error would have had, e.g. 503); for a malformed line or a stream
    that ended without its done line they are None.
    """

    def __init__(
        self, message: str, *, type: str | None = None, param: str | None = None, code: int | None = None
    ) -> None:
        super().__init__(message)
        self.type = type
        self.param = param
        self.code = code


class BroadcastError(EspoError):
    """A call that `espo_client.replicas` sends to every replica failed on some of them.

    `succeeded`: the base URLs where it took effect; `failed`: base URL -> the exception it raised
    there (the first one is also `__cause__`). The message names both sides: after `load_weights`,
    `succeeded` serve the new weights and `failed` are left on the old ones (one that timed out may
    have loaded them late), so replicas on mixed versions are never left to be found later.
    """

    def __init__(
        self, message: str, *, succeeded: Sequence[str], failed: Mapping[str, BaseException]
    ) -> None:
        super().__init__(message)
        self.succeeded = tuple(succeeded)
        self.failed = dict(failed)


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a 4xx/5xx response, its fields taken from the error envelope if there is one.

    The body must have been read (`response.read()` for a streamed response).
    """
    body: Any = None
    message = response.reason_phrase or "error"
    type_: str | None = None
    param: str | None = None
    code: int | None = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = response.text.strip()
        if text:
            message = text[:1000]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message", message))
            type_ = error.get("type")
            param = error.get("param")
            code = error.get("code") if isinstance(error.get("code"), int) else None
        elif "detail" in body:  # a framework's default error body, or a HealthResponse from /readyz
            message = json.dumps(body["detail"]) if not isinstance(body["detail"], str) else body["detail"]
            if isinstance(body.get("status"), str):
                message = f"{body['status']}: {message}"
    cls = status_error_class(response.status_code)
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    return cls(
        message, response=response, type=type_, param=param, code=code, body=body, retry_after=retry_after
    )


def transport_error(exc: httpx.TransportError) -> TransportError:
    """Our exception for an httpx transport exception (the caller raises it `from exc`)."""
    try:
        url: str | None = str(exc.request.url)
    except RuntimeError:  # an httpx exception raised without a request attached
        url = None
    detail = str(exc) or type(exc).__name__
    where = f" ({url})" if url else ""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ConnectError(f"could not connect to the ESPO server{where}: {detail}", url=url)
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeoutError(f"timed out waiting for the ESPO server{where}: {detail}", url=url)
    return TransportError(f"transport error talking to the ESPO server{where}: {detail}", url=url)
