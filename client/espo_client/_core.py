"""The logic of `EspoClient` and `AsyncEspoClient`, written once and doing no I/O.

Every API call is an *operation*: a generator that yields the I/O it needs as steps, receives each
step's outcome back, and returns the call's result (the sans-I/O pattern). A driver, the sync or the
async client, executes the steps and nothing else:

    step                 what the driver does                 and sends back
    Send(request)        http.send(request, stream=...)       the httpx.Response (*)
    Sleep(seconds)       time.sleep / asyncio.sleep           None
    Read(response)       response.read / aread                the body (bytes)
    Lines(response)      response.iter_lines / aiter_lines    the iterator (opaque to this module)
    NextLine(lines)      next / anext on that iterator        the next line, or None at the end
    Close(response)      response.close / aclose              None
    Item(trajectory)     hands the trajectory (or a complete   None, when the caller wants the next
                         group of them) to the caller

    (*) read and closed; with `stream=True` and a 2xx status, open with its body unread.

An `httpx.TransportError` from a step is sent back instead of a reply and raised inside the
operation at its `yield`, where the retry policy and the exception mapping (`_exceptions`) see it.
`Operation` wraps the generator and keeps the responses it holds open: however it ends (returned,
raised, or closed by the caller), those come out as Close steps before its result or its error.

The policy lives here: request building (headers, body, the `request_id` kept by every retry),
retries (connection failures, 429 and 503 only, jittered exponential backoff honouring
Retry-After), the parsing of answers into `protocol` models, and the NDJSON stream decoding.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from ._exceptions import (
    RETRIED_STATUS_ERRORS,
    ConnectError,
    EspoError,
    ResponseValidationError,
    ServiceUnavailableError,
    StreamError,
    status_error,
    transport_error,
)
from .protocol import (
    CommitRequest,
    CriticWeightsRequest,
    CriticWeightsResponse,
    DoneEvent,
    ErrorEvent,
    EspoState,
    GroupEvent,
    HealthResponse,
    InfoResponse,
    Prompt,
    RolloutRequest,
    RolloutResponse,
    RolloutStreamEvent,
    RunRequest,
    RunResponse,
    StateResponse,
    Trajectory,
    TrajectoryEvent,
    WeightFilesResponse,
    WeightsRequest,
    WeightsResponse,
)

logger = logging.getLogger("espo_client")

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)
"""Connect 10 s; read 600 s, because one rollout call may generate for minutes; write and pool 60 s."""
DEFAULT_MAX_RETRIES = 2
"""Retries after the first attempt, for connection failures, 429 and 503 answers only."""

_EVENTS: TypeAdapter[TrajectoryEvent | GroupEvent | DoneEvent | ErrorEvent] = TypeAdapter(RolloutStreamEvent)
_M = TypeVar("_M", bound=BaseModel)
_S = TypeVar("_S")
T = TypeVar("T")

PromptLike = Prompt | Sequence[int] | str | Mapping[str, Any]
"""A prompt: a `Prompt`, a sequence of token ids, a text, or a dict of Prompt's fields."""


# ---------------------------------------------------------------------------------------------
# Steps, and the operation that yields them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    request: httpx.Request
    stream: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Read:
    response: httpx.Response


@dataclass(frozen=True)
class Lines:
    response: httpx.Response


@dataclass(frozen=True)
class NextLine:
    lines: Any  # the driver's Iterator[str] or AsyncIterator[str]


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Item:
    """For the caller: a trajectory as it arrives, or (`group`) a prompt group now complete."""

    trajectory: Trajectory | None = None
    group: list[Trajectory] | None = None


@dataclass(frozen=True)
class Done(Generic[T]):
    value: T


class UploadBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A request body streamed from `chunks()` (byte chunks, made afresh for each attempt), for
    both drivers, with the headers that describe it."""

    def __init__(
        self, chunks: Callable[[], Iterable[bytes | memoryview]], headers: Mapping[str, str]
    ) -> None:
        self._chunks = chunks
        self.headers = dict(headers)

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks()  # type: ignore[misc]  # bytes-like: h11 copies it into its frame

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks():
            yield chunk  # type: ignore[misc]


Step = Send | Sleep | Read | Lines | NextLine | Close
"""The steps a driver executes (an Item goes to the caller instead)."""
Op = Generator[Step | Item, Any, T]
"""An operation's generator: yields steps, receives their replies, returns the call's result."""


class Operation(Generic[T]):
    """One API call being driven: its generator, and the responses it holds open.

    `advance(reply)` resumes the generator with the reply to its last step and returns the next
    step. Once the generator has ended (returned, raised, or been `close()`d), `advance` returns a
    Close step for each response still open, then raises its error once, or returns Done: with its
    result, or None if it failed or was closed.
    """

    def __init__(self, gen: Op[T]) -> None:
        self._gen: Op[T] | None = gen
        self._open: list[httpx.Response] = []
        self._error: BaseException | None = None
        self._done: Done[Any] = Done(None)

    def advance(self, reply: Any = None) -> Step | Item | Done[T]:
        if self._gen is not None:
            if isinstance(reply, httpx.Response) and not reply.is_closed:
                self._open.append(reply)  # a streamed answer: this operation reads it, or it is closed
            try:
                if isinstance(reply, httpx.TransportError):
                    return self._gen.throw(reply)
                return self._gen.send(reply)
            except StopIteration as stop:
                self._done = Done(stop.value)
            except BaseException as exc:
                self._error = exc
            self._gen = None
        while self._open:
            response = self._open.pop()
            if not response.is_closed:
                return Close(response)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._done

    def close(self) -> None:
        """Abandon the call: what it holds open comes out of `advance` as Close steps."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None


class Closing:
    """`with obj:` closes obj at the end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClosing:
    """`async with obj:` closes obj at the end."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------
# The shared base: configuration and every API operation
# ---------------------------------------------------------------------------------------------


class BaseClient:
    """What `EspoClient` and `AsyncEspoClient` share: the configuration and every API operation.

    The `*_op` methods return operations; only `self._http.build_request` (no I/O) is used here.
    """

    _http: httpx.Client | httpx.AsyncClient
    _transport_type: type[httpx.BaseTransport] | type[httpx.AsyncBaseTransport]

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """
        Args:
            base_url: the server, e.g. "http://rollouts:8000" (default: `ESPO_BASE_URL`).
            api_key: sent as `Authorization: Bearer <api_key>` (default: `ESPO_API_KEY`, if set).
            timeout: seconds, or an `httpx.Timeout`; default connect 10 s, read 600 s.
            max_retries: retries after a connection failure, a 429 or a 503, all counted together
                (never for other errors).
            backoff: first retry waits about `backoff` seconds, then doubling (jittered).
            backoff_max: cap of one wait (also of a longer `Retry-After` the server asks for).
            headers: extra headers for every request.
            transport: an httpx transport, sync for EspoClient and async for AsyncEspoClient
                (tests: `httpx.MockTransport(handler)`, which is both).
        """
        if base_url is None:
            base_url = os.environ.get("ESPO_BASE_URL", "")
            if not base_url.strip():
                raise ValueError("give base_url= (or set ESPO_BASE_URL)")
            if "," in base_url:
                raise ValueError("ESPO_BASE_URL names several servers: use espo_client.replicas for them")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0")
        self.base_url = base_url.strip().rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("ESPO_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._extra_headers = dict(headers or {})
        self._streams: weakref.WeakSet[Operation[Any]] = weakref.WeakSet()
        if transport is not None and not isinstance(transport, self._transport_type):
            raise TypeError(f"{type(self).__name__} needs an httpx.{self._transport_type.__name__}")
        self._http = self._http_client(transport)

    def _http_client(self, transport: Any) -> httpx.Client | httpx.AsyncClient:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": _user_agent(), "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self._extra_headers)
        return headers

    def _abandon_streams(self) -> list[Operation[Any]]:
        """Close every stream still open (for `close()`); the driver then runs their Close steps."""
        streams = list(self._streams)
        for op in streams:
            op.close()
        return streams

    # --- the operations ------------------------------------------------------------------------

    def _rollouts_op(self, request: RolloutRequest) -> Op[RolloutResponse]:
        with _tagged(request):
            return (yield from self._call("POST", "/v1/rollouts", RolloutResponse, request))

    def _stream_op(self, request: RolloutRequest) -> Operation[RolloutResponse]:
        """An Item per trajectory as the server sends it, then the whole response (trajectories in
        prompt order); registered, so that `close()` of the client closes it."""
        op = Operation(self._stream(request))
        self._streams.add(op)
        return op

    def _state_op(self) -> Op[StateResponse]:
        return self._call("GET", "/v1/espo/state", StateResponse)

    def _set_state_op(self, state: EspoState | Mapping[str, Any]) -> Op[StateResponse]:
        body = state if isinstance(state, EspoState) else TypeAdapter(EspoState).validate_python(state)
        return self._call("PUT", "/v1/espo/state", StateResponse, body)

    def _commit_op(self, batch_id: str | None) -> Op[StateResponse]:
        return self._call("POST", "/v1/espo/commit", StateResponse, CommitRequest(batch_id=batch_id))

    def _load_weights_op(self, path: str, version: int | None) -> Op[WeightsResponse]:
        return self._call("POST", "/v1/weights", WeightsResponse, WeightsRequest(path=path, version=version))

    def _open_run_op(self, run_id: str | None) -> Op[RunResponse]:
        return self._call("POST", "/v1/runs", RunResponse, RunRequest(run_id=run_id))

    def _describe_run_op(self, run_id: str) -> Op[RunResponse]:
        return self._call("GET", f"/v1/runs/{_path(run_id)}", RunResponse)

    def _close_run_op(self, run_id: str) -> Op[RunResponse]:
        return self._call("DELETE", f"/v1/runs/{_path(run_id)}", RunResponse)

    def _load_critic_weights_op(self, path: str, version: int | None) -> Op[CriticWeightsResponse]:
        body = CriticWeightsRequest(path=path, version=version)
        return self._call("POST", "/v1/critic/weights", CriticWeightsResponse, body)

    def _weight_files_op(self, critic: bool) -> Op[WeightFilesResponse]:
        return self._call("GET", f"/v1{'/critic' if critic else ''}/weights/files", WeightFilesResponse)

    def _info_op(self) -> Op[InfoResponse]:
        return self._call("GET", "/v1/info", InfoResponse)

    def _health_op(self) -> Op[HealthResponse]:
        return self._call("GET", "/healthz", HealthResponse)

    def _ready_op(self) -> Op[HealthResponse]:
        return self._call("GET", "/readyz", HealthResponse, retry=False)

    def _wait_ready_op(self, timeout: float, interval: float) -> Op[None]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                yield from self._ready_op()
                return
            except (ServiceUnavailableError, ConnectError):
                if time.monotonic() + interval > deadline:
                    raise
            yield Sleep(interval)

    # --- plumbing ------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        body: BaseModel | EspoState | None = None,
        *,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
        upload: UploadBody | None = None,
    ) -> Op[httpx.Response]:
        """Send, retrying connection failures, 429s and 503s; return a 2xx response (open and unread
        with `stream`) or raise the mapped error. Every attempt sends the same request (same body; an
        `upload` body is streamed, and read again for a retry)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if stream:
            headers["Accept"] = "application/x-ndjson"
        if upload is not None:
            headers.update(upload.headers)
        request = self._http.build_request(
            method, self.base_url + path, content=_body(body), params=params, headers=headers
        )
        if upload is not None:  # the same request, its body streamed
            request = httpx.Request(
                method, request.url, headers=request.headers, stream=upload, extensions=request.extensions
            )
        retries = self.max_retries if retry else 0
        for attempt in itertools.count():
            retry_after: float | None = None
            try:
                response = yield Send(request, stream)
                if response.is_success:
                    return response
                if stream:
                    yield Read(response)  # the error envelope
            except httpx.TransportError as exc:
                error: EspoError = transport_error(exc)
                if not (isinstance(error, ConnectError) and attempt < retries):
                    raise error from exc
            else:
                error = status_error(response)
                if not (isinstance(error, RETRIED_STATUS_ERRORS) and attempt < retries):
                    raise error
                retry_after = error.retry_after
            delay = self._retry_delay(attempt, retry_after)
            logger.warning(
                "%s %s: %s; retry %d/%d in %.2fs", method, request.url, error, attempt + 1, retries, delay
            )
            yield Sleep(delay)

    def _call(
        self,
        method: str,
        path: str,
        model: type[_M],
        body: BaseModel | EspoState | None = None,
        *,
        retry: bool = True,
    ) -> Op[_M]:
        response = yield from self._send(method, path, body, retry=retry)
        return _parse(model, response)

    def _stream(self, request: RolloutRequest) -> Op[RolloutResponse]:
        with _tagged(request):
            response = yield from self._send(
                "POST", "/v1/rollouts", request, params={"stream": "true"}, stream=True
            )
            try:
                if response.headers.get("content-type", "").startswith("application/json"):
                    yield Read(response)  # a server that answered without streaming: the same, at once
                    whole = _parse(RolloutResponse, response)
                    for trajectory in whole.trajectories:
                        yield Item(trajectory)
                    return _in_prompt_order(whole, whole.trajectories)
                lines = yield Lines(response)
                trajectories: list[Trajectory] = []
                while (line := (yield NextLine(lines))) is not None:
                    event = _event(line)
                    if isinstance(event, TrajectoryEvent):
                        trajectories.append(event.trajectory)
                        yield Item(event.trajectory)
                    elif isinstance(event, GroupEvent):
                        yield Item(group=_group(trajectories, event, request.request_id or ""))
                    elif isinstance(event, DoneEvent):
                        return _in_prompt_order(event.response, trajectories)
                    elif isinstance(event, ErrorEvent):
                        error = event.error
                        raise StreamError(
                            f"{self.base_url}: rollout stream failed: {error.code} {error.type}: "
                            f"{error.message}",
                            type=error.type,
                            param=error.param,
                            code=error.code,
                        )
                raise StreamError(f"{self.base_url}: the rollout stream ended before its done line")
            except httpx.TransportError as exc:
                raise transport_error(exc) from exc

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        return retry_delay(attempt, retry_after, self.backoff, self.backoff_max)


def retry_delay(attempt: int, retry_after: float | None, backoff: float, backoff_max: float) -> float:
    """The wait before retry `attempt + 1`: `backoff * 2**attempt` jittered to 50-100%, at least the
    server's `retry_after` (seconds), never more than `backoff_max` (every client's retries)."""
    delay = min(backoff_max, backoff * 2**attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(backoff_max, retry_after))
    return delay


class BaseStream:
    """What every stream class shares: the request, and the whole response once exhausted."""

    def __init__(self, request: RolloutRequest) -> None:
        self.request = request
        self._response: RolloutResponse | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id or ""

    @property
    def response(self) -> RolloutResponse:
        """The whole RolloutResponse, trajectories in prompt order; only once the stream is exhausted."""
        if self._response is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._response


class ClientStream(BaseStream):
    """A stream over one server: the client's streaming operation, driven by the subclass."""

    def __init__(self, client: Any, request: RolloutRequest) -> None:
        super().__init__(request)
        self._client = client
        self._op = client._stream_op(request)
        self._groups: list[list[Trajectory]] = []

    def _take(self, step: Item | Done[RolloutResponse]) -> Trajectory | bool | None:
        """The trajectory of an Item (a group Item is kept for `pop_groups`, and gives True); at Done,
        keep the response and return None (the end)."""
        if isinstance(step, Item):
            if step.group is not None:
                self._groups.append(step.group)
                return True
            return step.trajectory
        if step.value is not None:
            self._response = step.value
        return None

    def pop_groups(self) -> list[list[Trajectory]]:
        """The prompt groups completed since the last call, each all `n` trajectories of one prompt
        (from the server's group events): a group-relative learner can score them right away.

            for trajectory in stream:
                for group in stream.pop_groups():
                    ...
        """
        groups, self._groups = self._groups, []
        return groups


# ---------------------------------------------------------------------------------------------
# Requests and answers
# ---------------------------------------------------------------------------------------------


def rollout_request(
    request: RolloutRequest | Mapping[str, Any] | None, kwargs: dict[str, Any]
) -> RolloutRequest:
    """The request to send, with a `request_id` (a fresh uuid unless the caller set one)."""
    if request is not None and kwargs:
        raise TypeError("pass a RolloutRequest or keyword arguments, not both")
    if request is None:
        if "prompts" not in kwargs:
            raise TypeError("rollouts() needs prompts=[...] (or a RolloutRequest)")
        fields = dict(kwargs)
        fields["prompts"] = [_to_prompt(prompt) for prompt in fields["prompts"]]
        request = RolloutRequest(**fields)
    elif not isinstance(request, RolloutRequest):
        request = RolloutRequest.model_validate(request)
    if request.request_id is None:
        request = request.model_copy(update={"request_id": uuid.uuid4().hex})
    return request


@contextmanager
def _tagged(request: RolloutRequest) -> Generator[None, None, None]:
    """Errors of a rollout call carry its request_id, for the caller's own retry."""
    try:
        yield
    except EspoError as exc:
        exc.request_id = request.request_id
        raise


def _to_prompt(prompt: PromptLike) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return Prompt(text=prompt)
    if isinstance(prompt, Mapping):
        return Prompt.model_validate(prompt)
    return Prompt(token_ids=[int(token) for token in prompt])


def _body(model: BaseModel | EspoState | None) -> bytes | None:
    if model is None:
        return None
    if isinstance(model, BaseModel):
        return model.model_dump_json(exclude_none=True).encode()
    return TypeAdapter(type(model)).dump_json(model, exclude_none=True)


def _parse(model: type[_M], response: httpx.Response) -> _M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ResponseValidationError(
            f"{response.request.method} {response.request.url}: the answer is not a valid "
            f"{model.__name__} (client and server versions differ?): {exc}"
        ) from exc


def _in_prompt_order(response: RolloutResponse, trajectories: Sequence[Trajectory]) -> RolloutResponse:
    """The server's order: this call's groups by prompt, then carried-over ones by the call that
    started them."""
    ordered = sorted(trajectories, key=trajectory_order)
    return response.model_copy(update={"trajectories": ordered})


def trajectory_order(t: Trajectory) -> tuple[bool, str, int, int]:
    origin = t.carried.request_id if t.carried else ""
    return (t.carried is not None, origin, t.prompt_index, t.sample_index)


def _group(trajectories: Sequence[Trajectory], event: GroupEvent, request_id: str) -> list[Trajectory]:
    """The trajectories of the group that a GroupEvent announces (they were all sent before it)."""

    def key(t: Trajectory) -> tuple[str, int]:
        return (t.carried.request_id if t.carried else request_id, t.prompt_index)

    members = [t for t in trajectories if key(t) == (event.carried_from or request_id, event.prompt_index)]
    if len(members) != event.sample_count:
        raise StreamError(
            f"group event for prompt {event.prompt_index} announces {event.sample_count} trajectories; "
            f"{len(members)} were sent"
        )
    return sorted(members, key=lambda t: t.sample_index)


def _path(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")


def _event(line: str) -> TrajectoryEvent | GroupEvent | DoneEvent | ErrorEvent | None:
    """Parse one NDJSON line; None for blank lines and event types this client does not know."""
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise StreamError(f"malformed stream line: {line[:200]!r}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise StreamError(f"stream line without a type: {line[:200]!r}")
    if obj["type"] not in ("trajectory", "group", "done", "error"):
        return None  # forward compatible: a newer server's extra event types are skipped
    try:
        return _EVENTS.validate_python(obj)
    except ValidationError as exc:
        raise StreamError(f"invalid {obj['type']!r} stream line: {exc}") from exc


def _user_agent() -> str:
    try:
        return f"espo-client/{metadata.version('espo-client')}"
    except metadata.PackageNotFoundError:
        return "espo-client"
