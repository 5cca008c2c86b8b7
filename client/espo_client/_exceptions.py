"""Exceptions raised by `EspoClient`, `AsyncEspoClient` and the replica clients (`espo_client.replicas`).

One base class, then a branch for "no HTTP answer" and a branch for "the server said no":

    EspoError                        base of everything a client call raises
    ├── TransportError               no HTTP response; raised `from` the httpx exception
    │   ├── ConnectError             never reached a server: refused, DNS, connect timeout   [retried]
    │   └── RequestTimeoutError      read / write / pool timeout: the server may still be working
    ├── APIStatusError               a 4xx/5xx answer: status_code, message, type, param, response
    │   ├── BadRequestError          4xx: the caller's mistake (422 validation, 401, 404, 409, ...)
    │   ├── ServiceUnavailableError  503: engine or critic down, not ready, draining        [retried]
    │   └── ServerError              any other 5xx
    ├── ResponseValidationError      a 2xx body that is not the protocol's model (client/server skew)
    ├── StreamError                  a streamed rollout failed after its 200: an error line, a bad
    │                                line, or a stream that ended without its done line
    └── BroadcastError               a call sent to every replica failed on some: which did it, which not

Only `ConnectError` and `ServiceUnavailableError` are retried (with exponential backoff, up to
`max_retries`): neither lets the server start the work twice. A rollout call keeps its `request_id`
across retries, so a server that did start it returns the first result instead of sampling again;
a rollout call's error carries that `request_id`, for a retry by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

__all__ = [
    "APIStatusError",
    "BadRequestError",
    "BroadcastError",
    "ConnectError",
    "EspoError",
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
    """

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        type: str | None = None,
        param: str | None = None,
        code: int | None = None,
        body: Any = None,
    ) -> None:
        self.status_code = response.status_code
        self.response = response
        self.type = type
        self.param = param
        self.code = code if code is not None else response.status_code
        self.body = body
        prefix = f"{self.status_code} {type}" if type else str(self.status_code)
        where = f" (param: {param})" if param else ""
        super().__init__(f"{prefix}: {message}{where}")
        self.message = message


class BadRequestError(APIStatusError):
    """A 4xx status: the request is wrong (validation, authentication, unknown batch, ...). Not retried."""


class ServiceUnavailableError(APIStatusError):
    """A 503 status: the engine or the critic is down or not ready. Retried with backoff."""


class ServerError(APIStatusError):
    """A 5xx status other than 503. Not retried: the server may have done part of the work."""


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
    status = response.status_code
    if status == 503:
        cls: type[APIStatusError] = ServiceUnavailableError
    elif 400 <= status < 500:
        cls = BadRequestError
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIStatusError
    return cls(message, response=response, type=type_, param=param, code=code, body=body)


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
