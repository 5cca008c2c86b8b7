"""Fakes for the client tests: an in-process fake rollout server (httpx.MockTransport, no network),
and fixtures that connect to it with either driver.

`connect` gives an `EspoClient`, or an `AsyncEspoClient` behind `Blocking` (each call run to
completion on one event loop), so one test body exercises the sync and the async driver of the same
core. `replicas` does the same for `Replicas` (the blocking flavour, on its own event loop thread)
and `AsyncReplicas`. Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict
from typing import Any

import httpx
import pytest

import espo_client
from espo_client import AsyncEspoClient, AsyncReplicas, EspoClient, Replicas
from espo_client.protocol import EspoState
from espo_client.stop_rule import BatchStats, EspoParams, StopRule, update_state

# ---------------------------------------------------------------------------------------------
# A fake server: answers from the request alone, and records every request it saw
# ---------------------------------------------------------------------------------------------

PROMPTS = [[10, 1], [11, 1, 2], [12], [13, 5], [14]]

RULE_PARAMS = {"a_ema": 0.9, "tau": 0.25, "eta_beta": 0.1, "beta0": 7.0, "warm_after_batches": None}


def fake_rollout(body: dict) -> dict:
    """Trajectory (i, j): token_ids [first prompt token, j]. Sample j of local prompt i is stopped
    when j == 0, so every shard has stops; regret moments depend on the prompt tokens."""
    trajectories, regret_tokens, regret_sum, regret_sumsq = [], 0, 0.0, 0.0
    prompt_tokens = 0
    for i, prompt in enumerate(body["prompts"]):
        prompt = {"token_ids": [99]} if "text" in prompt else prompt
        prompt_tokens += len(prompt["token_ids"])
        for j in range(body.get("n", 1)):
            stopped = j == 0
            trajectories.append(
                {
                    "prompt_index": i,
                    "sample_index": j,
                    "token_ids": [prompt["token_ids"][0], j],
                    "logprobs": [-0.5, -0.25],
                    "end_reason": "espo_stop" if stopped else "eos",
                    "stop_step": 1 if stopped else None,
                    "reward": -1.0 if stopped else 1.0,
                    "policy_version": 3,
                }
            )
            for g in (0.1 * prompt["token_ids"][0], 0.5 * j):
                regret_tokens += 1
                regret_sum += g
                regret_sumsq += g * g
    state = EspoState(**body["state"]) if "state" in body else EspoState(batches=5)
    n_traj = len(trajectories)
    n_stop = len(body["prompts"])
    usage = {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": 2 * n_traj,
        "trajectories": n_traj,
        "stopped": n_stop,
        "tokens_saved_estimate": n_stop,
        "critic_calls": n_stop,
        "critic_time_s": 0.5,
        "wall_time_s": 1.0 + len(body["prompts"]),
        "regret_tokens": regret_tokens,
        "regret_sum": regret_sum,
        "regret_sumsq": regret_sumsq,
    }
    rule = StopRule(body.get("stop_rule", "none"))
    steers = rule.steers_beta  # as the server: other rules' trajectories count toward mu/var only
    stats = BatchStats(regret_tokens, regret_sum, regret_sumsq, n_traj * steers, n_stop * steers)
    after = update_state(
        state,
        stats,
        EspoParams().with_overrides({k: v for k, v in RULE_PARAMS.items() if v is not None}),
    )
    return {
        "request_id": body["request_id"],
        "trajectories": trajectories,
        "usage": usage,
        "stop_rule": rule.value,
        "shadow": body.get("shadow", False),
        "rule_params": RULE_PARAMS,
        "state_used": asdict(state),
        "state_after": asdict(after),
        "policy_version": 3,
    }


def ndjson(response: dict) -> bytes:
    lines = [{"type": "trajectory", "trajectory": t} for t in reversed(response["trajectories"])]
    lines.append({"type": "done", "response": {**response, "trajectories": []}})
    return b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"


def envelope(status: int, message: str, type_: str, param: str | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return httpx.Response(status, json=body)


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A streamed body, one chunk per line, that records being closed (as a real connection's
    would be released); with `hang`, it then waits forever (async only) instead of ending."""

    def __init__(self, content: bytes, *, hang: bool = False) -> None:
        self.chunks = content.splitlines(keepends=True)
        self.hang = hang
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.hang:
            await asyncio.Event().wait()

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


Handler = Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """Records (host, method, path, body, request) and answers. `script` overrides the first
    answers; `routes[(host, path)]` overrides that replica's route; `hang` names the hosts whose
    streams hang after their first trajectory. Every streamed body is kept in `bodies`."""

    def __init__(
        self,
        script: list[Handler] | None = None,
        *,
        routes: dict[tuple[str, str], Handler] | None = None,
        hang: tuple[str, ...] = (),
    ) -> None:
        self.calls: list[tuple[str, str, str, dict | None, httpx.Request]] = []
        self.script = list(script or [])
        self.routes = dict(routes or {})
        self.hang = hang
        self.bodies: list[Body] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        host, path = request.url.host, request.url.path
        self.calls.append((host, request.method, path, body, request))
        if self.script:
            return self.script.pop(0)(request)
        if (host, path) in self.routes:
            return self.routes[host, path](request)
        if path == "/v1/rollouts":
            response = fake_rollout(body)
            if request.url.params.get("stream") != "true":
                return httpx.Response(200, json=response)
            content = ndjson(response)
            if host in self.hang:
                content = content.splitlines(keepends=True)[0]
            self.bodies.append(Body(content, hang=host in self.hang))
            return httpx.Response(
                200, stream=self.bodies[-1], headers={"content-type": "application/x-ndjson"}
            )
        if path == "/v1/weights":
            version = body.get("version") or (7 if host == "a" else 8)
            return httpx.Response(200, json={"policy_version": version, "load_time_s": 2.0})
        if path in ("/v1/espo/state", "/v1/espo/commit"):
            state = body if request.method == "PUT" else asdict(EspoState())
            return httpx.Response(200, json={"state": state})
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, json={"status": "ok"})
        return envelope(404, f"no route {path}", "not_found")

    def rollout_bodies(self) -> list[dict]:
        return [body for _, _, path, body, _ in self.calls if path == "/v1/rollouts"]


def connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def unavailable(request: httpx.Request) -> httpx.Response:
    return envelope(503, "engine is restarting", "service_unavailable")


# ---------------------------------------------------------------------------------------------
# One test, both drivers
# ---------------------------------------------------------------------------------------------


class Blocking:
    """An async client behind blocking calls, each run to completion on `loop`."""

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name == "stream_rollouts":
            return lambda *args, **kwargs: BlockingStream(attr(*args, **kwargs), self._loop)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._loop.run_until_complete(attr(*args, **kwargs))
        return attr

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())


class BlockingStream:
    def __init__(self, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> BlockingStream:
        return self

    def __next__(self) -> Any:
        try:
            return self._loop.run_until_complete(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __enter__(self) -> BlockingStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._stream.aclose())


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """connect(server, **options): a client of the fake server, with either driver."""

    def connect(server: FakeServer, **options: Any) -> Any:
        options = {"base_url": "http://a", "backoff": 0.0, **options}
        if request.param == "sync":
            return EspoClient(transport=httpx.MockTransport(server), **options)
        return Blocking(AsyncEspoClient(transport=httpx.MockTransport(server), **options), loop)

    return connect


@pytest.fixture(params=["sync", "async"])
def replicas(request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """replicas(server, hosts, **options): a Replicas, or an AsyncReplicas behind Blocking."""

    def replicas(server: FakeServer, hosts: str = "ab", **options: Any) -> Any:
        options = {"base_urls": [f"http://{host}" for host in hosts], "backoff": 0.0, **options}
        if request.param == "sync":
            return Replicas(transport=httpx.MockTransport(server), **options)
        return Blocking(AsyncReplicas(transport=httpx.MockTransport(server), **options), loop)

    return replicas


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the drivers asked for (without waiting)."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(espo_client._client.time, "sleep", waits.append)
    monkeypatch.setattr(espo_client._client.asyncio, "sleep", async_sleep)
    return waits
