"""`EspoClient` and `AsyncEspoClient`: the ESPO rollout server's HTTP API as Python calls.

    from espo_client import EspoClient

    with EspoClient(base_url="http://rollouts:8000", api_key="...") as client:
        client.wait_ready()
        response = client.rollouts(prompts=[[1, 2, 3], [4, 5]], n=4, max_tokens=512, stop_rule="espo")
        for trajectory in response.trajectories:
            ...  # token_ids, logprobs, end_reason, reward (see learner.trajectories_to_tensors)

Behaviour shared by both clients (it is written once, in `_core`; the classes here only do the I/O):

* Timeouts are always on: connect 10 s, read 600 s (a rollout call can generate for minutes), write
  and pool 60 s. Pass `timeout=` (seconds or an `httpx.Timeout`) to change them.
* Retries: only connection failures (the request never reached a server), 429 (backpressure:
  `RateLimitError`) and 503 answers, up to `max_retries` times in all, waiting
  `backoff * 2**attempt` seconds (jittered to 50-100%), at least the server's `Retry-After`, at
  most `backoff_max`. Other 4xx (`ConflictError` for a 409 among them) and 5xx are never retried.
* Idempotency: every rollout call carries a `request_id` (a fresh uuid unless the caller set one),
  reused by every retry, so a server that already ran the request returns its first result.
* `close()` closes every stream still open, then the connections.

One client talks to one server. For several replicas (prompts sharded over them, state-changing
calls broadcast), see `espo_client.replicas`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, cast

import httpx

from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    AsyncClosing,
    BaseClient,
    ClientStream,
    Close,
    Closing,
    Done,
    Item,
    Lines,
    NextLine,
    Op,
    Operation,
    Read,
    Send,
    Sleep,
    Step,
    T,
    rollout_request,
)
from ._uploads import upload_op
from .checkpoint import DEFAULT_SHARD_BYTES
from .protocol import (
    CriticWeightsResponse,
    EspoState,
    HealthResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RunResponse,
    StateResponse,
    Trajectory,
    WeightFilesResponse,
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


# ---------------------------------------------------------------------------------------------
# Synchronous client
# ---------------------------------------------------------------------------------------------


class EspoClient(BaseClient, Closing):
    """Blocking client of one ESPO rollout server. Thread-safe, but a stream belongs to one thread."""

    _transport_type = httpx.BaseTransport

    def _http_client(self, transport: Any) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, headers=self._headers(), transport=transport)

    def close(self) -> None:
        """Close the streams still open, then the connection pool."""
        for op in self._abandon_streams():
            self._advance(op)
        self._http.close()

    def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        """`POST /v1/rollouts`: sample `n` trajectories per prompt under a stop rule.

        Pass a `RolloutRequest`, or its fields as keywords (`prompts` may be lists of token ids or
        strings). Trajectories come back sorted by (prompt_index, sample_index).
        """
        return self._run(self._rollouts_op(rollout_request(request, kwargs)))

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutStream:
        """`POST /v1/rollouts?stream=true`: trajectories as they finish.

            with client.stream_rollouts(prompts=..., n=8) as stream:
                for trajectory in stream:
                    ...
            response = stream.response  # usage, states, and all trajectories in prompt order

        The request is sent when iteration starts; it is retried (connection failure, 429, 503) only
        until the server has answered 200, never once trajectories flow.
        """
        return RolloutStream(self, rollout_request(request, kwargs))

    def state(self) -> StateResponse:
        """`GET /v1/espo/state`: the server-owned ESPO state."""
        return self._run(self._state_op())

    def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        """`PUT /v1/espo/state`: replace the server-owned ESPO state."""
        return self._run(self._set_state_op(state))

    def commit(self, batch_id: str | None = None) -> StateResponse:
        """`POST /v1/espo/commit`: close the open batch (or `batch_id`), folding it into the state."""
        return self._run(self._commit_op(batch_id))

    def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        """`POST /v1/weights`: serve the weights in `path` (as `version`); returns once served."""
        return self._run(self._load_weights_op(path, version))

    def open_run(self, run_id: str | None = None) -> RunResponse:
        """`POST /v1/runs`: open a run, which carries unfinished groups from one call to the next
        (`rollouts(..., run_id=..., return_groups=B, leftover="carry")`)."""
        return self._run(self._open_run_op(run_id))

    def describe_run(self, run_id: str) -> RunResponse:
        """`GET /v1/runs/{run_id}`: what the run carries."""
        return self._run(self._describe_run_op(run_id))

    def close_run(self, run_id: str) -> RunResponse:
        """`DELETE /v1/runs/{run_id}`: close the run; the samples it carries are aborted."""
        return self._run(self._close_run_op(run_id))

    def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        """`POST /v1/critic/weights`: serve the critic weights in `path` (as `version`, default
        current + 1) once the running rollouts finish; returns once served. The server checks the
        directory (tensor names, shapes, architecture) against its critic and answers 400 if it does
        not fit, the old critic serving on. A remote `espo-server critic` gets the push forwarded:
        `path` is read on the critic's machine."""
        return self._run(self._load_critic_weights_op(path, version))

    def upload_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> WeightsResponse:
        """Push the policy's weights over HTTP, no shared file system needed; returns once they
        serve (like `load_weights`).

        `weights`: a torch module (its `state_dict()`), a mapping name -> tensor, or an iterable of
        (name, tensor) pairs, read lazily (a weight hook's generator). The tensors are sent as
        safetensors shards of about `shard_bytes`, streamed from their memory: nothing is written
        to disk and no copy of the model is made. `config`: the checkpoint's HF config, checked
        against the served architecture (default: `weights.config` of a transformers model)."""
        return self._run(
            upload_op(self, "policy", weights, version=version, config=_dict(config), shard_bytes=shard_bytes)
        )

    def upload_critic_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> CriticWeightsResponse:
        """`upload_weights` for the critic (`/v1/critic/weights/uploads`; a remote critic gets it
        relayed by the rollout server)."""
        return self._run(
            upload_op(self, "critic", weights, version=version, config=_dict(config), shard_bytes=shard_bytes)
        )

    def info(self) -> InfoResponse:
        """`GET /v1/info`: model, versions, rule defaults, limits."""
        return self._run(self._info_op())

    def weight_files(self, critic: bool = False) -> WeightFilesResponse:
        """`GET /v1/weights/files` (`critic`: `/v1/critic/weights/files`): the files of the weights
        serving, with sizes, SHA-256 and the version: what a replica started with `--join` copies."""
        return self._run(self._weight_files_op(critic))

    def health(self) -> HealthResponse:
        """`GET /healthz`: the process is alive."""
        return self._run(self._health_op())

    def ready(self) -> HealthResponse:
        """`GET /readyz`, not retried: raises ServiceUnavailableError while the server is not ready."""
        return self._run(self._ready_op())

    def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Poll `/readyz` until the server is ready; after `timeout` seconds, raise the last
        ServiceUnavailableError or ConnectError."""
        self._run(self._wait_ready_op(timeout, interval))

    # --- the I/O -------------------------------------------------------------------------------

    def _run(self, gen: Op[T]) -> T:
        return cast(Done[T], self._advance(Operation(gen))).value

    def _advance(self, op: Operation[T]) -> Item | Done[T]:
        """Execute the operation's steps up to its next Item or its end."""
        reply: Any = None
        while not isinstance(step := op.advance(reply), (Item, Done)):
            reply = self._execute(step)
        return step

    def _execute(self, step: Step) -> Any:
        try:
            if isinstance(step, Send):
                return self._http.send(step.request, stream=step.stream)
            if isinstance(step, Sleep):
                return time.sleep(step.seconds)
            if isinstance(step, Read):
                return step.response.read()
            if isinstance(step, Lines):
                return step.response.iter_lines()
            if isinstance(step, NextLine):
                return next(step.lines, None)
            assert isinstance(step, Close)
            return step.response.close()
        except httpx.TransportError as exc:
            return exc


class RolloutStream(ClientStream, Closing):
    """The trajectories of a streamed rollout call, in the order they finish.

    Iterate it (ideally inside `with`, which closes the connection if you stop early); once it is
    exhausted, `response` is the whole RolloutResponse, its trajectories in prompt order.
    """

    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> Trajectory:
        while (trajectory := self._take(self._client._advance(self._op))) is True:
            pass  # a complete group, kept for pop_groups()
        if trajectory is None:
            raise StopIteration
        return trajectory

    def close(self) -> None:
        """Stop reading and close the connection (nothing to do once the stream is exhausted)."""
        self._op.close()
        self._client._advance(self._op)


# ---------------------------------------------------------------------------------------------
# Asynchronous client
# ---------------------------------------------------------------------------------------------


class AsyncEspoClient(BaseClient, AsyncClosing):
    """The asyncio flavour of `EspoClient`: the same constructor and methods, awaited."""

    _transport_type = httpx.AsyncBaseTransport

    def _http_client(self, transport: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, headers=self._headers(), transport=transport)

    async def aclose(self) -> None:
        """Close the streams still open, then the connection pool."""
        for op in self._abandon_streams():
            await self._advance(op)
        await self._http.aclose()

    async def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        """`POST /v1/rollouts` (see `EspoClient.rollouts`)."""
        return await self._run(self._rollouts_op(rollout_request(request, kwargs)))

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> AsyncRolloutStream:
        """`POST /v1/rollouts?stream=true` (see `EspoClient.stream_rollouts`); not awaited:

        async with client.stream_rollouts(prompts=..., n=8) as stream:
            async for trajectory in stream:
                ...
        response = stream.response
        """
        return AsyncRolloutStream(self, rollout_request(request, kwargs))

    async def state(self) -> StateResponse:
        return await self._run(self._state_op())

    async def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        return await self._run(self._set_state_op(state))

    async def commit(self, batch_id: str | None = None) -> StateResponse:
        return await self._run(self._commit_op(batch_id))

    async def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        return await self._run(self._load_weights_op(path, version))

    async def open_run(self, run_id: str | None = None) -> RunResponse:
        return await self._run(self._open_run_op(run_id))

    async def describe_run(self, run_id: str) -> RunResponse:
        return await self._run(self._describe_run_op(run_id))

    async def close_run(self, run_id: str) -> RunResponse:
        return await self._run(self._close_run_op(run_id))

    async def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        return await self._run(self._load_critic_weights_op(path, version))

    async def upload_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> WeightsResponse:
        """See `EspoClient.upload_weights` (the shards are made in this event loop's thread)."""
        op = upload_op(
            self, "policy", weights, version=version, config=_dict(config), shard_bytes=shard_bytes
        )
        return await self._run(op)

    async def upload_critic_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> CriticWeightsResponse:
        op = upload_op(
            self, "critic", weights, version=version, config=_dict(config), shard_bytes=shard_bytes
        )
        return await self._run(op)

    async def info(self) -> InfoResponse:
        return await self._run(self._info_op())

    async def weight_files(self, critic: bool = False) -> WeightFilesResponse:
        return await self._run(self._weight_files_op(critic))

    async def health(self) -> HealthResponse:
        return await self._run(self._health_op())

    async def ready(self) -> HealthResponse:
        return await self._run(self._ready_op())

    async def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        await self._run(self._wait_ready_op(timeout, interval))

    # --- the I/O -------------------------------------------------------------------------------

    async def _run(self, gen: Op[T]) -> T:
        return cast(Done[T], await self._advance(Operation(gen))).value

    async def _advance(self, op: Operation[T]) -> Item | Done[T]:
        reply: Any = None
        while not isinstance(step := op.advance(reply), (Item, Done)):
            reply = await self._execute(step)
        return step

    async def _execute(self, step: Step) -> Any:
        try:
            if isinstance(step, Send):
                return await self._http.send(step.request, stream=step.stream)
            if isinstance(step, Sleep):
                return await asyncio.sleep(step.seconds)
            if isinstance(step, Read):
                return await step.response.aread()
            if isinstance(step, Lines):
                return step.response.aiter_lines()
            if isinstance(step, NextLine):
                return await anext(step.lines, None)
            assert isinstance(step, Close)
            return await step.response.aclose()
        except httpx.TransportError as exc:
            return exc


class AsyncRolloutStream(ClientStream, AsyncClosing):
    """The asyncio flavour of `RolloutStream`: `async for` it, ideally inside `async with`."""

    def __aiter__(self) -> AsyncRolloutStream:
        return self

    async def __anext__(self) -> Trajectory:
        while (trajectory := self._take(await self._client._advance(self._op))) is True:
            pass  # a complete group, kept for pop_groups()
        if trajectory is None:
            raise StopAsyncIteration
        return trajectory

    async def aclose(self) -> None:
        self._op.close()
        await self._client._advance(self._op)


def _dict(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if config is None else dict(config)
