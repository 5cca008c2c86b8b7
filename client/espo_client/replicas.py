"""Several replicas of the rollout server behind one client: `AsyncReplicas`, and `Replicas` to block.

    from espo_client.replicas import Replicas

    with Replicas(base_urls=["http://10.0.0.5:8000", "http://10.0.0.6:8000"]) as client:
        client.wait_ready()
        response = client.rollouts(prompts=prompts, n=8, state=state)  # sharded; one merged answer
        state = response.state_after

It is a small load balancer over one `AsyncEspoClient` per replica (each with its own retries):

* A rollout call is split into contiguous blocks of prompts, one per replica (all `n` samples of a
  prompt stay on one replica; a call with fewer prompts than replicas uses fewer, starting at a
  replica that rotates from call to call). The shards run concurrently and their answers are merged
  back into prompt order; see `_merge` for exactly how, including learner-owned ESPO state.
* Calls that change server state (`set_state`, `commit`, `load_weights`, `load_critic_weights`,
  `upload_weights`, `upload_critic_weights`: each shard made once, sent to all) go to every
  replica and wait for all of them. If some fail, `BroadcastError` names the replicas where the call
  took effect and those where it did not: after `load_weights`, which serve the new weights and
  which are left on the old ones. Replicas on mixed versions are never left silently.
* Calls that read (`state`, `info`, `health`, `ready`) ask one replica, `replica=` (default 0).
* `close()` / `aclose()`, of the client or of a stream, closes every shard stream.

`Replicas`, the blocking flavour, runs an `AsyncReplicas` on a private event loop in one background
thread (started by its constructor, stopped and joined by `close()`); it only waits for the results,
so the logic exists once. Its `transport=` is therefore an async one (`httpx.MockTransport` is both).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import threading
import weakref
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from . import stop_rule
from ._client import AsyncEspoClient, AsyncRolloutStream
from ._core import AsyncClosing, BaseStream, Closing, rollout_request
from ._exceptions import BroadcastError, EspoError, ResponseValidationError
from ._uploads import abandon_upload_op, commit_upload_op, hf_config, open_upload_op, put_shard_op
from .checkpoint import DEFAULT_SHARD_BYTES, shards
from .protocol import (
    CriticWeightsResponse,
    EspoState,
    HealthResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    StateResponse,
    Trajectory,
    UploadResponse,
    Usage,
    WeightsResponse,
)

__all__ = ["AsyncReplicaStream", "AsyncReplicas", "ReplicaStream", "Replicas"]

_REQUEST_ID_MAX = 200  # RolloutRequest.request_id's max_length
_T = TypeVar("_T")
_W = TypeVar("_W", WeightsResponse, CriticWeightsResponse)


@dataclass(frozen=True)
class _Shard:
    """One replica's part of a rollout call: a contiguous block of the call's prompts."""

    client: AsyncEspoClient
    request: RolloutRequest
    prompts: range
    """Global (whole-call) index of each of this shard's prompts."""


class AsyncReplicas(AsyncClosing):
    """One client over several replicas: rollout calls sharded, state-changing calls broadcast."""

    def __init__(self, *, base_urls: Sequence[str] | None = None, **options: Any) -> None:
        """
        Args:
            base_urls: the replicas (default: `ESPO_BASE_URL`, comma-separated).
            options: keyword arguments of `AsyncEspoClient` (api_key, timeout, max_retries, backoff,
                backoff_max, headers, transport) for the client of each replica.
        """
        if base_urls is None:
            base_urls = [url for url in os.environ.get("ESPO_BASE_URL", "").split(",") if url.strip()]
        if not base_urls:
            raise ValueError("give base_urls=[...] (or set ESPO_BASE_URL, comma-separated)")
        self.clients = tuple(AsyncEspoClient(base_url=url, **options) for url in base_urls)
        self._round_robin = itertools.count()
        self._streams: weakref.WeakSet[AsyncReplicaStream] = weakref.WeakSet()

    @property
    def base_urls(self) -> tuple[str, ...]:
        return tuple(client.base_url for client in self.clients)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_urls={list(self.base_urls)!r})"

    async def aclose(self) -> None:
        """Close every stream still open, then every replica's client."""
        for stream in list(self._streams):
            await stream.aclose()
        await asyncio.gather(*(client.aclose() for client in self.clients))

    async def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        """`EspoClient.rollouts`, sharded; on the first shard's failure the others are cancelled."""
        request = rollout_request(request, kwargs)
        shards = self._plan(request)
        try:
            responses = await _gather([shard.client.rollouts(shard.request) for shard in shards])
        except EspoError as exc:
            exc.request_id = request.request_id
            raise
        return _merge(request, shards, responses)

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> AsyncReplicaStream:
        """`AsyncEspoClient.stream_rollouts`, sharded: the shards' trajectories interleaved."""
        request = rollout_request(request, kwargs)
        stream = AsyncReplicaStream(request, self._plan(request))
        self._streams.add(stream)
        return stream

    async def state(self, *, replica: int = 0) -> StateResponse:
        return await self._replica(replica).state()

    async def info(self, *, replica: int = 0) -> InfoResponse:
        return await self._replica(replica).info()

    async def health(self, *, replica: int = 0) -> HealthResponse:
        return await self._replica(replica).health()

    async def ready(self, *, replica: int = 0) -> HealthResponse:
        return await self._replica(replica).ready()

    async def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Wait until every replica is ready (`EspoClient.wait_ready`, concurrently)."""
        await _gather([client.wait_ready(timeout, interval) for client in self.clients])

    async def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        """`PUT /v1/espo/state` on every replica; the first replica's answer."""
        calls = [client.set_state(state) for client in self.clients]
        return (await self._broadcast("set_state", calls, "hold the new state", "keep their old one"))[0]

    async def commit(self, batch_id: str | None = None) -> StateResponse:
        """`POST /v1/espo/commit` on every replica; the first replica's answer."""
        calls = [client.commit(batch_id) for client in self.clients]
        return (await self._broadcast("commit", calls, "committed", "did not commit"))[0]

    async def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        """`POST /v1/weights` on every replica; returns once all serve the new weights, with the
        slowest `load_time_s`.

        Raises BroadcastError if some replicas failed (naming those on the new weights and those
        left on the old ones), and EspoError if all loaded but report different versions (pass
        `version=` to keep them in step). Either way, call it again to bring them into line.
        """
        calls = [client.load_weights(path, version) for client in self.clients]
        responses = await self._broadcast(
            f"load_weights({path!r})", calls, "serve the new weights", "are left on the old version"
        )
        return self._policy_answer(responses, "load_weights")

    async def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        """`POST /v1/critic/weights` on every replica (each pushes its own critic; replicas sharing
        one remote critic push it once each, which loads the same weights again); returns once all
        serve them. Raises BroadcastError naming the replicas on the new critic and those left on the
        old one, and EspoError if they report different critic versions (pass `version=`)."""
        calls = [client.load_critic_weights(path, version) for client in self.clients]
        responses = await self._broadcast(
            f"load_critic_weights({path!r})", calls, "serve the new critic", "keep the old critic"
        )
        return self._critic_answer(responses, "load_critic_weights")

    async def upload_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> WeightsResponse:
        """`EspoClient.upload_weights` to every replica: each shard is made once and sent to all
        replicas at once, then every replica commits. Raises BroadcastError as `load_weights` does
        (a failure before the commit leaves every replica on its old weights, the uploads deleted)."""
        responses = await self._upload("policy", weights, version, config, shard_bytes)
        return self._policy_answer(responses, "upload_weights")

    async def upload_critic_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> CriticWeightsResponse:
        """`upload_weights` for the critic of every replica."""
        responses = await self._upload("critic", weights, version, config, shard_bytes)
        return self._critic_answer(responses, "upload_critic_weights")

    async def _upload(
        self,
        target: str,
        weights: Any,
        version: int | None,
        config: Mapping[str, Any] | None,
        shard_bytes: int,
    ) -> list[Any]:
        what = f"upload_{'critic_' if target == 'critic' else ''}weights"
        body = hf_config(weights) if config is None else dict(config)
        opens = [client._run(open_upload_op(client, target, body)) for client in self.clients]
        results = await asyncio.gather(*opens, return_exceptions=True)
        ids = [r.upload_id if isinstance(r, UploadResponse) else None for r in results]
        try:
            await self._broadcast(what, _settled(results), "opened the upload", "did not: nothing loaded")
            for shard in shards(weights, shard_bytes=shard_bytes):
                puts = [
                    c._run(put_shard_op(c, target, i, shard)) for c, i in zip(self.clients, ids, strict=True)
                ]
                await self._broadcast(what, puts, f"took {shard.name}", "did not: nothing loaded anywhere")
        except BaseException:
            abandons = [
                c._run(abandon_upload_op(c, target, i)) for c, i in zip(self.clients, ids, strict=True) if i
            ]
            await asyncio.gather(*abandons, return_exceptions=True)
            raise
        commits = [
            c._run(commit_upload_op(c, target, i, version)) for c, i in zip(self.clients, ids, strict=True)
        ]
        done, not_done = ("serve the new weights", "are left on the old version")
        if target == "critic":
            done, not_done = ("serve the new critic", "keep the old critic")
        return await self._broadcast(what, commits, done, not_done)

    def _policy_answer(self, responses: Sequence[WeightsResponse], what: str) -> WeightsResponse:
        return self._one_version(responses, "policy_version", what)

    def _critic_answer(self, responses: Sequence[CriticWeightsResponse], what: str) -> CriticWeightsResponse:
        return self._one_version(responses, "critic_version", what)

    def _one_version(self, responses: Sequence[_W], field: str, what: str) -> _W:
        """The replicas' answers to a push as one: their version (EspoError if they differ), the
        slowest load time."""
        versions = {url: getattr(r, field) for url, r in zip(self.base_urls, responses, strict=True)}
        if len(set(versions.values())) > 1:
            raise EspoError(
                f"replicas now serve different {field.split('_')[0]} versions {versions}: call {what} "
                "again with an explicit version= to bring them into line"
            )
        load_time_s = max(response.load_time_s for response in responses)
        return responses[0].model_copy(update={"load_time_s": load_time_s})

    # --- plumbing ------------------------------------------------------------------------------

    def _replica(self, replica: int) -> AsyncEspoClient:
        if not 0 <= replica < len(self.clients):
            raise IndexError(f"replica {replica} out of range: there are {len(self.clients)}")
        return self.clients[replica]

    async def _broadcast(
        self, what: str, calls: Sequence[Awaitable[_T]], done: str, not_done: str
    ) -> list[_T]:
        """Await one call per replica, every one to its end (a replica's outcome is never left
        unknown); if any failed, raise BroadcastError naming where it took effect and where not."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = {
            url: r for url, r in zip(self.base_urls, results, strict=True) if isinstance(r, BaseException)
        }
        if not failed:
            return list(results)  # type: ignore[arg-type]
        succeeded = [url for url in self.base_urls if url not in failed]
        errors = "; ".join(f"{url}: {type(exc).__name__}: {exc}" for url, exc in failed.items())
        raise BroadcastError(
            f"{what} failed on {len(failed)} of {len(results)} replicas. "
            f"{', '.join(succeeded) or 'none'} {done}; {', '.join(failed)} {not_done} ({errors})",
            succeeded=succeeded,
            failed=failed,
        ) from next(iter(failed.values()))

    def _plan(self, request: RolloutRequest) -> list[_Shard]:
        """Split a call's prompts into contiguous blocks, one per replica (as many as there are
        prompts, at most one per replica), starting at a replica that rotates from call to call.

        Blocks are contiguous so that seeds stay those of a single server: the server seeds sample j
        of its prompt i with `seed + i*n + j`, so a shard starting at global prompt `lo` is sent
        `seed + lo*n`. Each shard gets its own request id, `<request_id>-<k>of<K>`.
        """
        if request.run_id is not None or request.return_groups is not None:
            raise ValueError(
                "runs (run_id) and early return (return_groups) are per server: a run's carried groups "
                "live on one replica; use one EspoClient per replica for them"
            )
        clients = self.clients
        n_prompts = len(request.prompts)
        n_shards = min(len(clients), n_prompts)
        start = next(self._round_robin) % len(clients)
        if n_shards == 1:
            return [_Shard(clients[start], request, range(n_prompts))]
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
            client = clients[(start + k) % len(clients)]
            shards.append(_Shard(client, request.model_copy(update=update), range(lo, hi)))
        return shards


class AsyncReplicaStream(BaseStream, AsyncClosing):
    """A sharded `AsyncRolloutStream`: each shard streams in its own task, trajectories (with global
    prompt indices) come in the order they arrive; `response` is the merged one."""

    def __init__(self, request: RolloutRequest, shards: list[_Shard]) -> None:
        super().__init__(request)
        self._shards = shards
        self._streams: list[AsyncRolloutStream] = [s.client.stream_rollouts(s.request) for s in shards]
        self._items: asyncio.Queue[Trajectory | BaseException | None] = asyncio.Queue()  # None: a shard's end
        self._tasks: list[asyncio.Task[None]] | None = None
        self._running = len(shards)

    def __aiter__(self) -> AsyncReplicaStream:
        return self

    async def __anext__(self) -> Trajectory:
        if self._tasks is None:
            self._tasks = [asyncio.ensure_future(self._pump(k)) for k in range(len(self._shards))]
        while self._running:
            item = await self._items.get()
            if isinstance(item, Trajectory):
                return item
            if item is not None:  # a shard failed
                await self.aclose()
                if isinstance(item, EspoError):
                    item.request_id = self.request_id
                raise item
            self._running -= 1
            if not self._running:  # every shard is done
                self._response = _merge(self.request, self._shards, [s.response for s in self._streams])
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop every shard's task and close its stream."""
        self._running = 0
        tasks, self._tasks = self._tasks or [], []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in self._streams:
            await stream.aclose()

    async def _pump(self, k: int) -> None:
        shard = self._shards[k]
        try:
            async for trajectory in self._streams[k]:
                self._items.put_nowait(_remap(shard, trajectory))
        except Exception as exc:
            self._items.put_nowait(exc)
        else:
            self._items.put_nowait(None)


# ---------------------------------------------------------------------------------------------
# The blocking flavour: AsyncReplicas on a private event loop thread
# ---------------------------------------------------------------------------------------------


class Replicas(Closing):
    """`AsyncReplicas` for blocking code: the same constructor and methods, not awaited.

    The calls run on a private event loop in a background thread, started here and stopped (and
    joined) by `close()`: use it in a `with` block. `transport=` is an async httpx transport.
    """

    def __init__(self, *, base_urls: Sequence[str] | None = None, **options: Any) -> None:
        """The arguments of `AsyncReplicas` (`transport=`, if given, an async one)."""
        self._replicas = AsyncReplicas(base_urls=base_urls, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="espo-replicas", daemon=True)
        self._thread.start()

    @property
    def base_urls(self) -> tuple[str, ...]:
        return self._replicas.base_urls

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_urls={list(self.base_urls)!r})"

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self) -> None:
        """Close every stream and client, then stop and join the event loop thread."""
        if self.closed:
            return
        try:
            self._wait(self._replicas.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> RolloutResponse:
        return self._wait(self._replicas.rollouts(request, **kwargs))

    def stream_rollouts(
        self, request: RolloutRequest | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> ReplicaStream:
        return ReplicaStream(self, self._wait(_call(self._replicas.stream_rollouts, request, **kwargs)))

    def state(self, *, replica: int = 0) -> StateResponse:
        return self._wait(self._replicas.state(replica=replica))

    def info(self, *, replica: int = 0) -> InfoResponse:
        return self._wait(self._replicas.info(replica=replica))

    def health(self, *, replica: int = 0) -> HealthResponse:
        return self._wait(self._replicas.health(replica=replica))

    def ready(self, *, replica: int = 0) -> HealthResponse:
        return self._wait(self._replicas.ready(replica=replica))

    def wait_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        self._wait(self._replicas.wait_ready(timeout, interval))

    def set_state(self, state: EspoState | Mapping[str, Any]) -> StateResponse:
        return self._wait(self._replicas.set_state(state))

    def commit(self, batch_id: str | None = None) -> StateResponse:
        return self._wait(self._replicas.commit(batch_id))

    def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        return self._wait(self._replicas.load_weights(path, version))

    def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        return self._wait(self._replicas.load_critic_weights(path, version))

    def upload_weights(self, weights: Any, **options: Any) -> WeightsResponse:
        """`AsyncReplicas.upload_weights` (the shards are made on the replicas' loop thread)."""
        return self._wait(self._replicas.upload_weights(weights, **options))

    def upload_critic_weights(self, weights: Any, **options: Any) -> CriticWeightsResponse:
        return self._wait(self._replicas.upload_critic_weights(weights, **options))

    def _wait(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the loop thread and wait for it (cancelled if the wait is interrupted)."""
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self!r} is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class ReplicaStream(Closing):
    """`AsyncReplicaStream` for blocking code: iterate it (inside `with`), then `response`."""

    def __init__(self, replicas: Replicas, stream: AsyncReplicaStream) -> None:
        self.request = stream.request
        self._replicas = replicas
        self._stream = stream

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def response(self) -> RolloutResponse:
        return self._stream.response

    def __iter__(self) -> ReplicaStream:
        return self

    def __next__(self) -> Trajectory:
        if self._replicas.closed:  # and so this stream
            raise StopIteration
        try:
            return self._replicas._wait(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        if not self._replicas.closed:
            self._replicas._wait(self._stream.aclose())


# ---------------------------------------------------------------------------------------------
# Shards and their answers
# ---------------------------------------------------------------------------------------------


def _merge(
    request: RolloutRequest, shards: Sequence[_Shard], responses: Sequence[RolloutResponse]
) -> RolloutResponse:
    """One RolloutResponse from the shards' answers (their trajectories' prompt indices are local).

    Always: trajectories with global prompt indices, sorted by (prompt_index, sample_index). With
    several shards:
    * `request_id` is the caller's; `stop_rule`, `shadow`, `rule_params` are the first shard's
      (the one holding prompt 0); `policy_version` is the oldest of the shards' versions (each
      trajectory carries its own).
    * `usage`: every counter and `critic_time_s` summed; `wall_time_s` the longest shard's (they
      run concurrently); `tokens_saved_estimate` the sum of each replica's estimate (each uses its
      own shard's mean unstopped length, so it can differ a little from one server's).
    * Learner-owned state (`request.state` set): every shard ran with that state, which is
      `state_used`; `state_after` is recomputed here with the shared pure update
      (`stop_rule.update_state`) from the summed regret moments and stop count of all shards
      (`RolloutResponse.batch_stats`), with the parameters in effect, which is exactly what one
      server would have returned.
    * Server-owned state: each replica keeps its own state and folds in only its own shard, so
      there is no single state; `state_used`/`state_after` are the first shard's. For one
      coherent state over several replicas, let the learner own it (send `state=` every call).
    """
    trajectories = sorted(
        (
            _remap(shard, trajectory)
            for shard, response in zip(shards, responses, strict=True)
            for trajectory in response.trajectories
        ),
        key=lambda t: (t.prompt_index, t.sample_index),
    )
    first = responses[0]
    if len(responses) == 1:
        return first.model_copy(update={"trajectories": trajectories})
    merged = RolloutResponse(
        request_id=request.request_id or first.request_id,
        trajectories=trajectories,
        usage=_sum_usage([response.usage for response in responses]),
        stop_rule=first.stop_rule,
        shadow=first.shadow,
        rule_params=first.rule_params,
        state_used=first.state_used,
        state_after=first.state_after,
        policy_version=min(response.policy_version for response in responses),
        prompt_token_ids=_merge_prompt_ids(shards, responses),
    )
    if request.state is None:
        return merged
    state_after = None
    if all(response.state_after is not None for response in responses):
        state_after = stop_rule.update_state(first.state_used, merged.batch_stats(), first.espo_params())
    return merged.model_copy(update={"state_after": state_after})


def _merge_prompt_ids(
    shards: Sequence[_Shard], responses: Sequence[RolloutResponse]
) -> list[list[int]] | None:
    """Every prompt's token ids, in call order, when any shard had a text prompt (else None, as one
    server answers); a shard of token-id prompts only contributes its prompts' own ids."""
    if all(response.prompt_token_ids is None for response in responses):
        return None
    merged: list[list[int]] = []
    for shard, response in zip(shards, responses, strict=True):
        if response.prompt_token_ids is not None:
            merged.extend(response.prompt_token_ids)
        else:
            merged.extend(list(prompt.token_ids or []) for prompt in shard.request.prompts)
    return merged


def _remap(shard: _Shard, trajectory: Trajectory) -> Trajectory:
    """A shard's trajectory with its prompt_index made global."""
    local = trajectory.prompt_index
    if not 0 <= local < len(shard.prompts):
        raise ResponseValidationError(
            f"{shard.client.base_url}: trajectory prompt_index {local} but the shard had "
            f"{len(shard.prompts)} prompt(s)"
        )
    glob = shard.prompts[local]
    return trajectory if glob == local else trajectory.model_copy(update={"prompt_index": glob})


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


def _settled(results: Sequence[Any]) -> list[Awaitable[Any]]:
    """Results gathered already, as the awaitables `_broadcast` takes (raising the failures)."""
    return [_returning(r) for r in results]


async def _returning(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


async def _gather(calls: Sequence[Awaitable[_T]]) -> list[_T]:
    """Await the calls concurrently and return their results in order; on the first failure the
    others are cancelled and the failure raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`, called on the event loop (for `Replicas._wait`)."""
    return function(*args, **kwargs)
