"""`EspoClient` and `AsyncEspoClient`: the ESPO rollout server's HTTP API as Python calls.

    from espo_client import EspoClient

    with EspoClient(base_url="http://rollouts:8000", api_key="...") as client:
        client.wait_ready()
        response = client.rollouts(prompts=[[1, 2, 3], [4, 5]], n=4, max_tokens=512, stop_rule="espo")
        for trajectory in response.trajectories:
            ...  # token_ids, logprobs, end_reason, reward (see learner.trajectories_to_tensors)

Behaviour shared by both clients (the `_BaseClient` below):

* Timeouts are always on: connect 10 s, read 600 s (a rollout call can generate for minutes), write
  and pool 60 s. Pass `timeout=` (seconds or an `httpx.Timeout`) to change them.
* Retries: only connection failures (the request never reached a server) and 503 answers, up to
  `max_retries` times, waiting `backoff * 2**attempt` seconds (jittered to 50-100%, capped at
  `backoff_max`, and at least the server's `Retry-After`). 4xx and other 5xx are never retried.
* Idempotency: every rollout call carries a `request_id` (a fresh uuid unless the caller set one),
  reused by every retry, so a server that already ran the request returns its first result.
* Several replicas (`base_urls=[...]`): a rollout call is split into contiguous blocks of prompts,
  one per replica (all `n` samples of a prompt stay on one replica), the shards run concurrently,
  and the answers are merged back into prompt order; see `_BaseClient._merge` for exactly how.
  Calls that change server state (`set_state`, `commit`, `load_weights`) go to every replica;
  calls that read it (`state`, `info`, `health`, `ready`) take `replica=` (default the first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from . import stop_rule
from ._exceptions import (
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
    DoneEvent,
    ErrorEvent,
    EspoState,
    HealthResponse,
    InfoResponse,
    Prompt,
    RolloutRequest,
    RolloutResponse,
    RolloutStreamEvent,
    StateResponse,
    Trajectory,
    TrajectoryEvent,
    Usage,
    WeightsRequest,
    WeightsResponse,
)

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "AsyncEspoClient",
    "AsyncRolloutStream",
    "EspoClient",
    "RolloutStream",
]

logger = logging.getLogger("espo_client")

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)
"""Connect 10 s; read 600 s, because one rollout call may generate for minutes; write and pool 60 s."""
DEFAULT_MAX_RETRIES = 2
"""Retries after the first attempt, for connection failures and 503 answers only."""

_REQUEST_ID_MAX = 200  # RolloutRequest.request_id's max_length
_EVENTS: TypeAdapter[TrajectoryEvent | DoneEvent | ErrorEvent] = TypeAdapter(RolloutStreamEvent)
_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

PromptLike = Prompt | Sequence[int] | str | Mapping[str, Any]
"""A prompt: a `Prompt`, a sequence of token ids, a text, or a dict of Prompt's fields."""


def _user_agent() -> str:
    try:
        return f"espo-client/{metadata.version('espo-client')}"
    except metadata.PackageNotFoundError:
        return "espo-client"


@dataclass(frozen=True)
class _Shard:
    """One replica's part of a rollout call: a contiguous block of the call's prompts."""

    base_url: str
    request: RolloutRequest
    prompt_indices: tuple[int, ...]
    """Global (whole-call) prompt index of each of this shard's prompts."""


# ---------------------------------------------------------------------------------------------
# The shared base: configuration, requests, sharding, merging, errors. No I/O.
# ---------------------------------------------------------------------------------------------


class _BaseClient:
    def __init__(
        self,
        *,
        base_url: str | None,
        base_urls: Sequence[str] | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        backoff: float,
        backoff_max: float,
        headers: Mapping[str, str] | None,
    ) -> None:
        if base_url is not None and base_urls is not None:
            raise ValueError("give base_url or base_urls, not both")
        if base_url is None and base_urls is None:
            env = os.environ.get("ESPO_BASE_URL")
            if not env:
                raise ValueError("give base_url= or base_urls= (or set ESPO_BASE_URL)")
            base_urls = [url for url in env.split(",") if url.strip()]
        urls = [base_url] if base_url is not None else list(base_urls or [])
        if not urls:
            raise ValueError("base_urls must not be empty")
        self.base_urls: tuple[str, ...] = tuple(url.strip().rstrip("/") for url in urls)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0")
        self.api_key = api_key if api_key is not None else os.environ.get("ESPO_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._extra_headers = dict(headers or {})
        self._round_robin = itertools.count()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_urls={list(self.base_urls)!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": _user_agent(), "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self._extra_headers)
        return headers

    def _replica(self, replica: int) -> str:
        if not 0 <= replica < len(self.base_urls):
            raise IndexError(f"replica {replica} out of range: this client has {len(self.base_urls)}")
        return self.base_urls[replica]

    # --- building requests ---------------------------------------------------------------------

    @staticmethod
    def _rollout_request(
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

    @staticmethod
    def _body(model: BaseModel | EspoState) -> bytes:
        if isinstance(model, BaseModel):
            return model.model_dump_json(exclude_none=True).encode()
        return TypeAdapter(type(model)).dump_json(model, exclude_none=True)

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.backoff_max, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, min(self.backoff_max, float(retry_after)))
            except ValueError:  # an HTTP date: keep our own backoff
                pass
        return delay

    @staticmethod
    def _parse(model: type[_M], response: httpx.Response) -> _M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ResponseValidationError(
                f"{response.request.method} {response.request.url}: the answer is not a valid "
                f"{model.__name__} (client and server versions differ?): {exc}"
            ) from exc

    # --- sharding over replicas ----------------------------------------------------------------

    def _plan(self, request: RolloutRequest) -> list[_Shard]:
        """Split a call's prompts into contiguous blocks, one per replica (as many as there are
        prompts, at most one per replica), starting at a replica that rotates from call to call.

        Blocks are contiguous so that seeds stay those of a single server: the server seeds sample j
        of its prompt i with `seed + i*n + j`, so a shard starting at global prompt `lo` is sent
        `seed + lo*n`. Each shard gets its own request id, `<request_id>-<k>of<K>`.
        """
        replicas = self.base_urls
        n_prompts = len(request.prompts)
        n_shards = min(len(replicas), n_prompts)
        start = next(self._round_robin) % len(replicas)
        if n_shards == 1:
            return [_Shard(replicas[start], request, tuple(range(n_prompts)))]
        bounds = [n_prompts * k // n_shards for k in range(n_shards + 1)]
        shards = []
        for k in range(n_shards):
            lo, hi = bounds[k], bounds[k + 1]
            update: dict[str, Any] = {
                "prompts": request.prompts[lo:hi],
                "request_id": _shard_request_id(request.request_id or "", k, n_shards),
            }
            if request.seed is not None:
                update["seed"] = request.seed + lo * request.n
            shards.append(
                _Shard(
                    replicas[(start + k) % len(replicas)],
                    request.model_copy(update=update),
                    tuple(range(lo, hi)),
                )
            )
        return shards

    @staticmethod
    def _remap(shard: _Shard, trajectory: Trajectory) -> Trajectory:
        """A shard's trajectory with its prompt_index made global."""
        local = trajectory.prompt_index
        if not 0 <= local < len(shard.prompt_indices):
            raise ResponseValidationError(
                f"{shard.base_url}: trajectory prompt_index {local} but the shard had "
                f"{len(shard.prompt_indices)} prompt(s)"
            )
        glob = shard.prompt_indices[local]
        return trajectory if glob == local else trajectory.model_copy(update={"prompt_index": glob})

    @staticmethod
    def _merge(
        request: RolloutRequest, responses: Sequence[RolloutResponse], trajectories: list[Trajectory]
    ) -> RolloutResponse:
        """One RolloutResponse from the shards' answers; `trajectories` already have global indices.

        Always: trajectories sorted by (prompt_index, sample_index). With several shards:
        * `request_id` is the caller's; `stop_rule`, `shadow`, `rule_params` are the first shard's
          (the one holding prompt 0); `policy_version` is the oldest of the shards' versions (each
          trajectory carries its own).
        * `usage`: every counter and `critic_time_s` summed; `wall_time_s` the longest shard's (they
          run concurrently); `tokens_saved_estimate` the sum of each replica's estimate (each uses its
          own shard's mean unstopped length, so it can differ a little from one server's).
        * Learner-owned state (`request.state` set): every shard ran with that state, which is
          `state_used`; `state_after` is recomputed here with the shared pure update
          (`stop_rule.update_state`) from the summed regret moments and stop count of all shards,
          with the parameters in effect, which is exactly what one server would have returned.
        * Server-owned state: each replica keeps its own state and folds in only its own shard, so
          there is no single state; `state_used`/`state_after` are the first shard's. For one
          coherent state over several replicas, let the learner own it (send `state=` every call).
        """
        trajectories = sorted(trajectories, key=lambda t: (t.prompt_index, t.sample_index))
        first = responses[0]
        if len(responses) == 1:
            return first.model_copy(update={"trajectories": trajectories})
        usage = _sum_usage([response.usage for response in responses])
        state_after = first.state_after
        if request.state is not None:
            if all(response.state_after is not None for response in responses):
                state_after = stop_rule.update_state(
                    first.state_used, usage.batch_stats(shadow=first.shadow), first.espo_params()
                )
            else:
                state_after = None
        return RolloutResponse(
            request_id=request.request_id or first.request_id,
            trajectories=trajectories,
            usage=usage,
            stop_rule=first.stop_rule,
            shadow=first.shadow,
            rule_params=first.rule_params,
            state_used=first.state_used,
            state_after=state_after,
            policy_version=min(response.policy_version for response in responses),
        )

    @staticmethod
    def _event(line: str) -> TrajectoryEvent | DoneEvent | ErrorEvent | None:
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
        if obj["type"] not in ("trajectory", "done", "error"):
            return None  # forward compatible: a newer server's extra event types are skipped
        try:
            return _EVENTS.validate_python(obj)
        except ValidationError as exc:
            raise StreamError(f"invalid {obj['type']!r} stream line: {exc}") from exc

    @staticmethod
    def _stream_failed(shard: _Shard, event: ErrorEvent) -> StreamError:
        error = event.error
        return StreamError(
            f"{shard.base_url}: rollout stream failed: {error.code} {error.type}: {error.message}",
            type=error.type,
            param=error.param,
            code=error.code,
        )

    @staticmethod
    def _check_versions(responses: Sequence[WeightsResponse]) -> WeightsResponse:
        versions = sorted({response.policy_version for response in responses})
        if len(versions) > 1:
            raise EspoError(
                f"replicas now serve different policy versions {versions}: call load_weights again "
                "with an explicit version= to bring them into line"
            )
        return WeightsResponse(
            policy_version=versions[0], load_time_s=max(response.load_time_s for response in responses)
        )


def _to_prompt(prompt: PromptLike) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return Prompt(text=prompt)
    if isinstance(prompt, Mapping):
        return Prompt.model_validate(prompt)
    return Prompt(token_ids=[int(token) for token in prompt])


def _shard_request_id(request_id: str, k: int, n_shards: int) -> str:
    suffix = f"-{k}of{n_shards}"
    if len(request_id) + len(suffix) > _REQUEST_ID_MAX:
        request_id = hashlib.sha256(request_id.encode()).hexdigest()[:32]
    return request_id + suffix


def _sum_usage(usages: Sequence[Usage]) -> Usage:
    fields: dict[str, Any] = {}
    for name in Usage.model_fields:
        values = [getattr(usage, name) for usage in usages]
        fields[name] = max(values) if name == "wall_time_s" else sum(values)
    return Usage(**fields)


def _state_body(state: EspoState | Mapping[str, Any]) -> EspoState:
    if isinstance(state, EspoState):
        return state
    return TypeAdapter(EspoState).validate_python(state)


# ---------------------------------------------------------------------------------------------
# Synchronous client
# ---------------------------------------------------------------------------------------------


class EspoClient(_BaseClient):
    """Blocking client of one ESPO rollout server or of several replicas.

    Thread-safe: shards and broadcasts to several replicas run on worker threads.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        base_urls: Sequence[str] | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """
        Args:
            base_url: the server, e.g. "http://rollouts:8000" (or `ESPO_BASE_URL`, comma-separated).
            base_urls: several replicas instead; rollout calls are sharded over them.
            api_key: sent as `Authorization: Bearer <api_key>` (default: `ESPO_API_KEY`, if set).
            timeout: seconds, or an `httpx.Timeout`; default connect 10 s, read 600 s.
            max_retries: retries after a connection failure or a 503 (never for other errors).
            backoff: first retry waits about `backoff` seconds, then doubling (jittered).
            backoff_max: cap of one wait.
            headers: extra headers for every request.
            transport: an httpx transport (tests: `httpx.MockTransport(handler)`).
        """
        super().__init__(
            base_url=base_url,
            base_urls=base_urls,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            backoff_max=backoff_max,
            headers=headers,
        )
        self._http = httpx.Client(timeout=self.timeout, headers=self._headers(), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EspoClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the public API ------------------------------------------------------------------------

    def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        """`POST /v1/rollouts`: sample `n` trajectories per prompt under a stop rule.

        Pass a `RolloutRequest`, or its fields as keywords (`prompts` may be lists of token ids or
        strings). Trajectories come back sorted by (prompt_index, sample_index).
        """
        request = self._rollout_request(request, kwargs)
        shards = self._plan(request)
        try:
            responses = _run_all([lambda shard=shard: self._rollout_shard(shard) for shard in shards])
        except EspoError as exc:
            exc.request_id = request.request_id
            raise
        trajectories = [
            self._remap(shard, trajectory)
            for shard, response in zip(shards, responses, strict=True)
            for trajectory in response.trajectories
        ]
        return self._merge(request, responses, trajectories)

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutStream:
        """`POST /v1/rollouts?stream=true`: trajectories as they finish.

            with client.stream_rollouts(prompts=..., n=8) as stream:
                for trajectory in stream:
                    ...
            response = stream.response  # usage, states, and all trajectories in prompt order

        The request is sent when iteration starts; it is retried (connection failure, 503) only
        until the server has answered 200, never once trajectories flow.
        """
        request = self._rollout_request(request, kwargs)
        return RolloutStream(self, request, self._plan(request))

    def state(self, *, replica: int = 0) -> StateResponse:
        """`GET /v1/espo/state` of one replica."""
        return self._call("GET", self._replica(replica), "/v1/espo/state", StateResponse)

    def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        """`PUT /v1/espo/state` on every replica; returns the first replica's answer."""
        body = _state_body(state)
        return self._broadcast("PUT", "/v1/espo/state", StateResponse, body)[0]

    def commit(self, batch_id: str | None = None) -> StateResponse:
        """`POST /v1/espo/commit`: close the open batch (or `batch_id`) on every replica; returns
        the first replica's answer."""
        return self._broadcast("POST", "/v1/espo/commit", StateResponse, CommitRequest(batch_id=batch_id))[0]

    def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        """`POST /v1/weights` on every replica; returns once all serve the new weights.

        `load_time_s` is the slowest replica's; raises EspoError if the replicas end up on
        different versions (pass `version=` to keep them in step).
        """
        responses = self._broadcast(
            "POST", "/v1/weights", WeightsResponse, WeightsRequest(path=path, version=version)
        )
        return self._check_versions(responses)

    def info(self, *, replica: int = 0) -> InfoResponse:
        """`GET /v1/info`: model, versions, rule defaults, limits."""
        return self._call("GET", self._replica(replica), "/v1/info", InfoResponse)

    def health(self, *, replica: int = 0) -> HealthResponse:
        """`GET /healthz`: the process is alive."""
        return self._call("GET", self._replica(replica), "/healthz", HealthResponse)

    def ready(self, *, replica: int = 0) -> HealthResponse:
        """`GET /readyz`, not retried: raises ServiceUnavailableError while the server is not ready."""
        return self._call("GET", self._replica(replica), "/readyz", HealthResponse, retry=False)

    def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Poll `/readyz` of every replica until all are ready; after `timeout` seconds, raise the
        last ServiceUnavailableError or ConnectError."""
        deadline = time.monotonic() + timeout
        for replica in range(len(self.base_urls)):
            while True:
                try:
                    self.ready(replica=replica)
                    break
                except (ServiceUnavailableError, ConnectError):
                    if time.monotonic() + interval > deadline:
                        raise
                    time.sleep(interval)

    # --- plumbing ------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
    ) -> httpx.Response:
        """Send with retries (connection failures and 503 only); return a 2xx response or raise."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if stream:
            headers["Accept"] = "application/x-ndjson"
        content = self._body(body) if body is not None else None
        attempt = 0
        while True:
            request = self._http.build_request(
                method, base_url + path, content=content, params=params, headers=headers
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = transport_error(exc)
                if retry and isinstance(error, ConnectError) and attempt < self.max_retries:
                    delay = self._retry_delay(attempt, None)
                    logger.warning("%s; retry %d/%d in %.2fs", error, attempt + 1, self.max_retries, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise error from exc
            if response.is_success:
                return response
            try:
                response.read()
            finally:
                response.close()
            status = status_error(response)
            if retry and isinstance(status, ServiceUnavailableError) and attempt < self.max_retries:
                delay = self._retry_delay(attempt, response)
                logger.warning(
                    "%s %s: %s; retry %d/%d in %.2fs",
                    method,
                    request.url,
                    status,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
                attempt += 1
                continue
            raise status

    def _call(
        self,
        method: str,
        base_url: str,
        path: str,
        model: type[_M],
        body: BaseModel | None = None,
        *,
        retry: bool = True,
    ) -> _M:
        return self._parse(model, self._send(method, base_url, path, body=body, retry=retry))

    def _broadcast(self, method: str, path: str, model: type[_M], body: BaseModel | None = None) -> list[_M]:
        return _run_all(
            [lambda url=url: self._call(method, url, path, model, body) for url in self.base_urls]
        )

    def _rollout_shard(self, shard: _Shard) -> RolloutResponse:
        return self._call("POST", shard.base_url, "/v1/rollouts", RolloutResponse, shard.request)

    def _stream_shard(self, shard: _Shard) -> Generator[Trajectory | RolloutResponse, None, None]:
        """Yield a shard's trajectories (global prompt indices), then its done response."""
        response = self._send(
            "POST", shard.base_url, "/v1/rollouts", body=shard.request, params={"stream": "true"}, stream=True
        )
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                response.read()  # a server that answered without streaming: same events, all at once
                whole = self._parse(RolloutResponse, response)
                yield from (self._remap(shard, trajectory) for trajectory in whole.trajectories)
                yield whole.model_copy(update={"trajectories": []})
                return
            for line in response.iter_lines():
                event = self._event(line)
                if isinstance(event, TrajectoryEvent):
                    yield self._remap(shard, event.trajectory)
                elif isinstance(event, DoneEvent):
                    yield event.response
                    return
                elif isinstance(event, ErrorEvent):
                    raise self._stream_failed(shard, event)
            raise StreamError(f"{shard.base_url}: the rollout stream ended before its done line")
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            response.close()


class RolloutStream:
    """The trajectories of a streamed rollout call, in the order they finish (prompt_index global).

    Iterate it (ideally inside `with`, which closes the connection if you stop early); once it is
    exhausted, `response` is the whole RolloutResponse, its trajectories in prompt order. With
    several replicas, each shard streams on its own thread and the trajectories are interleaved.
    """

    def __init__(self, client: EspoClient, request: RolloutRequest, shards: list[_Shard]) -> None:
        self.request = request
        self._client = client
        self._shards = shards
        self._gen: Generator[Trajectory, None, None] | None = None
        self._response: RolloutResponse | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id or ""

    @property
    def response(self) -> RolloutResponse:
        """The merged response; only once the stream is exhausted."""
        if self._response is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._response

    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> Trajectory:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    def __enter__(self) -> RolloutStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()

    def _run(self) -> Generator[Trajectory, None, None]:
        shards = self._shards
        done: list[RolloutResponse | None] = [None] * len(shards)
        trajectories: list[Trajectory] = []
        items = self._interleave() if len(shards) > 1 else self._single()
        try:
            for k, item in items:
                if isinstance(item, Trajectory):
                    trajectories.append(item)
                    yield item
                else:
                    done[k] = item
        except EspoError as exc:
            exc.request_id = self.request_id
            raise
        finally:
            items.close()
        responses = [response for response in done if response is not None]
        self._response = self._client._merge(self.request, responses, trajectories)

    def _single(self) -> Generator[tuple[int, Trajectory | RolloutResponse], None, None]:
        stream = self._client._stream_shard(self._shards[0])
        try:
            for item in stream:
                yield 0, item
        finally:
            stream.close()

    def _interleave(self) -> Generator[tuple[int, Trajectory | RolloutResponse], None, None]:
        """Run each shard's stream on a thread and yield (shard, item) as items arrive."""
        items: queue.Queue[tuple[int, Any]] = queue.Queue()
        stop = threading.Event()
        end = object()

        def pump(k: int, shard: _Shard) -> None:
            stream = self._client._stream_shard(shard)
            try:
                for item in stream:
                    if stop.is_set():
                        return
                    items.put((k, item))
            except Exception as exc:
                items.put((k, exc))
            finally:
                stream.close()
                items.put((k, end))

        threads = [
            threading.Thread(target=pump, args=(k, shard), daemon=True, name=f"espo-stream-{k}")
            for k, shard in enumerate(self._shards)
        ]
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                k, item = items.get()
                if item is end:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield k, item
        finally:
            stop.set()  # a shard still reading stops at its next line; its thread is a daemon


def _run_all(calls: Sequence[Callable[[], _T]]) -> list[_T]:
    """Run the calls concurrently on threads (one directly) and return their results in order;
    the first failure is raised without waiting for the others."""
    if len(calls) == 1:
        return [calls[0]()]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="espo-client")
    try:
        futures = [pool.submit(call) for call in calls]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Asynchronous client
# ---------------------------------------------------------------------------------------------


class AsyncEspoClient(_BaseClient):
    """The asyncio twin of `EspoClient`: the same constructor and methods, awaited."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        base_urls: Sequence[str] | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            base_urls=base_urls,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            backoff_max=backoff_max,
            headers=headers,
        )
        self._http = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(), transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncEspoClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- the public API ------------------------------------------------------------------------

    async def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        """`POST /v1/rollouts` (see `EspoClient.rollouts`)."""
        request = self._rollout_request(request, kwargs)
        shards = self._plan(request)
        try:
            responses = await _gather([self._rollout_shard(shard) for shard in shards])
        except EspoError as exc:
            exc.request_id = request.request_id
            raise
        trajectories = [
            self._remap(shard, trajectory)
            for shard, response in zip(shards, responses, strict=True)
            for trajectory in response.trajectories
        ]
        return self._merge(request, responses, trajectories)

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> AsyncRolloutStream:
        """`POST /v1/rollouts?stream=true` (see `EspoClient.stream_rollouts`); not awaited:

        async with client.stream_rollouts(prompts=..., n=8) as stream:
            async for trajectory in stream:
                ...
        response = stream.response
        """
        request = self._rollout_request(request, kwargs)
        return AsyncRolloutStream(self, request, self._plan(request))

    async def state(self, *, replica: int = 0) -> StateResponse:
        return await self._call("GET", self._replica(replica), "/v1/espo/state", StateResponse)

    async def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        body = _state_body(state)
        return (await self._broadcast("PUT", "/v1/espo/state", StateResponse, body))[0]

    async def commit(self, batch_id: str | None = None) -> StateResponse:
        return (
            await self._broadcast("POST", "/v1/espo/commit", StateResponse, CommitRequest(batch_id=batch_id))
        )[0]

    async def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        body = WeightsRequest(path=path, version=version)
        return self._check_versions(await self._broadcast("POST", "/v1/weights", WeightsResponse, body))

    async def info(self, *, replica: int = 0) -> InfoResponse:
        return await self._call("GET", self._replica(replica), "/v1/info", InfoResponse)

    async def health(self, *, replica: int = 0) -> HealthResponse:
        return await self._call("GET", self._replica(replica), "/healthz", HealthResponse)

    async def ready(self, *, replica: int = 0) -> HealthResponse:
        return await self._call("GET", self._replica(replica), "/readyz", HealthResponse, retry=False)

    async def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for replica in range(len(self.base_urls)):
            while True:
                try:
                    await self.ready(replica=replica)
                    break
                except (ServiceUnavailableError, ConnectError):
                    if time.monotonic() + interval > deadline:
                        raise
                    await asyncio.sleep(interval)

    # --- plumbing ------------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
    ) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if stream:
            headers["Accept"] = "application/x-ndjson"
        content = self._body(body) if body is not None else None
        attempt = 0
        while True:
            request = self._http.build_request(
                method, base_url + path, content=content, params=params, headers=headers
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = transport_error(exc)
                if retry and isinstance(error, ConnectError) and attempt < self.max_retries:
                    delay = self._retry_delay(attempt, None)
                    logger.warning("%s; retry %d/%d in %.2fs", error, attempt + 1, self.max_retries, delay)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                raise error from exc
            if response.is_success:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            status = status_error(response)
            if retry and isinstance(status, ServiceUnavailableError) and attempt < self.max_retries:
                delay = self._retry_delay(attempt, response)
                logger.warning(
                    "%s %s: %s; retry %d/%d in %.2fs",
                    method,
                    request.url,
                    status,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            raise status

    async def _call(
        self,
        method: str,
        base_url: str,
        path: str,
        model: type[_M],
        body: BaseModel | None = None,
        *,
        retry: bool = True,
    ) -> _M:
        return self._parse(model, await self._send(method, base_url, path, body=body, retry=retry))

    async def _broadcast(
        self, method: str, path: str, model: type[_M], body: BaseModel | None = None
    ) -> list[_M]:
        return await _gather([self._call(method, url, path, model, body) for url in self.base_urls])

    async def _rollout_shard(self, shard: _Shard) -> RolloutResponse:
        return await self._call("POST", shard.base_url, "/v1/rollouts", RolloutResponse, shard.request)

    async def _stream_shard(self, shard: _Shard) -> AsyncGenerator[Trajectory | RolloutResponse, None]:
        response = await self._send(
            "POST", shard.base_url, "/v1/rollouts", body=shard.request, params={"stream": "true"}, stream=True
        )
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                await response.aread()
                whole = self._parse(RolloutResponse, response)
                for trajectory in whole.trajectories:
                    yield self._remap(shard, trajectory)
                yield whole.model_copy(update={"trajectories": []})
                return
            async for line in response.aiter_lines():
                event = self._event(line)
                if isinstance(event, TrajectoryEvent):
                    yield self._remap(shard, event.trajectory)
                elif isinstance(event, DoneEvent):
                    yield event.response
                    return
                elif isinstance(event, ErrorEvent):
                    raise self._stream_failed(shard, event)
            raise StreamError(f"{shard.base_url}: the rollout stream ended before its done line")
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await response.aclose()


class AsyncRolloutStream:
    """The asyncio twin of `RolloutStream`: `async for` it, ideally inside `async with`."""

    def __init__(self, client: AsyncEspoClient, request: RolloutRequest, shards: list[_Shard]) -> None:
        self.request = request
        self._client = client
        self._shards = shards
        self._gen: AsyncGenerator[Trajectory, None] | None = None
        self._response: RolloutResponse | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id or ""

    @property
    def response(self) -> RolloutResponse:
        if self._response is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._response

    def __aiter__(self) -> AsyncRolloutStream:
        return self

    async def __anext__(self) -> Trajectory:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def __aenter__(self) -> AsyncRolloutStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    async def _run(self) -> AsyncGenerator[Trajectory, None]:
        shards = self._shards
        done: list[RolloutResponse | None] = [None] * len(shards)
        trajectories: list[Trajectory] = []
        try:
            async for k, item in self._items():
                if isinstance(item, Trajectory):
                    trajectories.append(item)
                    yield item
                else:
                    done[k] = item
        except EspoError as exc:
            exc.request_id = self.request_id
            raise
        responses = [response for response in done if response is not None]
        self._response = self._client._merge(self.request, responses, trajectories)

    async def _items(self) -> AsyncGenerator[tuple[int, Trajectory | RolloutResponse], None]:
        if len(self._shards) == 1:
            stream = self._client._stream_shard(self._shards[0])
            try:
                async for item in stream:
                    yield 0, item
            finally:
                await stream.aclose()
            return
        items: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        end = object()

        async def pump(k: int, shard: _Shard) -> None:
            stream = self._client._stream_shard(shard)
            try:
                async for item in stream:
                    items.put_nowait((k, item))
            except Exception as exc:
                items.put_nowait((k, exc))
            finally:
                await stream.aclose()
                items.put_nowait((k, end))

        tasks = [asyncio.ensure_future(pump(k, shard)) for k, shard in enumerate(self._shards)]
        running = len(tasks)
        try:
            while running:
                k, item = await items.get()
                if item is end:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield k, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _gather(calls: Sequence[Awaitable[_T]]) -> list[_T]:
    """Await the calls concurrently and return their results in order; on the first failure the
    others are cancelled and the failure raised."""
    if len(calls) == 1:
        return [await calls[0]]
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
