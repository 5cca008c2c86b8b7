"""The HTTP clients' 409 and 429: `ConflictError` (never retried) and `RateLimitError` (retried after
the server's Retry-After, within `max_retries`), with EspoClient, AsyncEspoClient and both replica
clients against the fake server of test_client.py; then against the real app and service (a
scripted engine) whose backpressure and idempotency answer them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from espo_client import (
    AsyncEspoClient,
    BadRequestError,
    BroadcastError,
    ConflictError,
    RateLimitError,
    ServiceUnavailableError,
)
from espo_client._exceptions import retry_after_seconds
from espo_server.app import build_app
from tests.fake_server import PROMPTS, FakeServer, Handler, envelope, fake_rollout, unavailable
from tests.fakes import FakeCritic, GatedEngine, service


def overloaded(retry_after: str | None = "2") -> Handler:
    """The server's 429: its envelope, and a Retry-After header."""

    def answer(request: httpx.Request) -> httpx.Response:
        response = envelope(429, "64 trajectories are generating: retry later", "overloaded")
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response

    return answer


def conflict(param: str) -> Handler:
    return lambda request: envelope(409, f"{param} clashes", "conflict", param)


# ---------------------------------------------------------------------------------------------
# 429: retried after Retry-After, within the retry budget
# ---------------------------------------------------------------------------------------------


def test_a_429_is_retried_after_retry_after_with_the_same_request_id(connect, sleeps) -> None:
    server = FakeServer([overloaded("2"), overloaded("0.25")])
    with connect(server, max_retries=2, backoff=0.0, backoff_max=8.0) as client:
        response = client.rollouts(prompts=[[10, 1]], n=2)
    bodies = server.rollout_bodies()
    assert len(bodies) == 3 and sleeps == [2.0, 0.25]  # what the server asked for, no less
    assert {body["request_id"] for body in bodies} == {response.request_id}
    assert len(response.trajectories) == 2


def test_429_and_503_share_the_retry_budget_then_the_429_is_raised(connect, sleeps) -> None:
    server = FakeServer([overloaded("1"), unavailable, overloaded("30")])
    with connect(server, max_retries=2, backoff=0.0, backoff_max=4.0) as client:
        with pytest.raises(RateLimitError) as info:
            client.rollouts(prompts=[[10]])
    assert len(server.calls) == 3 and sleeps == [1.0, 0.0]
    error = info.value
    assert (error.status_code, error.type, error.retry_after) == (429, "overloaded", 30.0)
    assert error.request_id == server.rollout_bodies()[0]["request_id"]  # for the caller's own retry
    assert not isinstance(error, BadRequestError)  # backpressure, not the caller's mistake


def test_a_long_retry_after_is_capped_at_backoff_max(connect, sleeps) -> None:
    server = FakeServer([overloaded("600"), overloaded(None), overloaded("a date")])
    with connect(server, max_retries=3, backoff=1.0, backoff_max=5.0) as client:
        client.health()
    capped, own, date = sleeps
    assert capped == 5.0
    assert 1.0 <= own <= 2.0 and 2.0 <= date <= 4.0  # no usable Retry-After: our jittered backoff


def test_max_retries_zero_raises_the_first_429(connect, sleeps) -> None:
    server = FakeServer([overloaded("1")])
    with connect(server, max_retries=0) as client, pytest.raises(RateLimitError):
        client.state()
    assert len(server.calls) == 1 and sleeps == []


def test_a_stream_is_retried_after_a_429_before_its_first_line(connect, sleeps) -> None:
    server = FakeServer([overloaded("1")])
    with connect(server) as client, client.stream_rollouts(prompts=PROMPTS[:2], n=2) as stream:
        assert len(list(stream)) == 4
    assert sleeps == [1.0] and len({body["request_id"] for body in server.rollout_bodies()}) == 1


def test_retry_after_values() -> None:
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    for bad in (None, "", "-1", "inf", "nan", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert retry_after_seconds(bad) is None, bad


# ---------------------------------------------------------------------------------------------
# 409: a ConflictError naming what clashed, never retried
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["request_id", "run_id", "batch_id"])
def test_a_409_is_a_conflict_error_and_not_retried(connect, sleeps, param: str) -> None:
    server = FakeServer([conflict(param)] * 3)
    with connect(server, max_retries=3) as client, pytest.raises(ConflictError) as info:
        client.rollouts(prompts=[[10]], request_id="mine")
    assert len(server.calls) == 1 and sleeps == []
    error = info.value
    assert (error.status_code, error.type, error.param, error.request_id) == (409, "conflict", param, "mine")
    assert isinstance(error, BadRequestError)  # as a 409 was before it had its own class


def test_commit_and_close_run_conflicts(connect) -> None:
    server = FakeServer([conflict("batch_id"), conflict("run_id")])
    with connect(server) as client:
        with pytest.raises(ConflictError, match="batch_id"):
            client.commit("b")
        with pytest.raises(ConflictError, match="run_id"):
            client.close_run("r")


# ---------------------------------------------------------------------------------------------
# Replicas: each replica's client retries; errors keep their types
# ---------------------------------------------------------------------------------------------


def test_replicas_retry_a_shards_429(replicas, sleeps) -> None:
    answers = [
        overloaded("1"),
        lambda request: httpx.Response(200, json=fake_rollout(json.loads(request.content))),
    ]
    server = FakeServer(routes={("b", "/v1/rollouts"): lambda request: answers.pop(0)(request)})
    with replicas(server) as client:
        response = client.rollouts(prompts=PROMPTS, n=2, request_id="rid")
    assert response.usage.trajectories == 10 and sleeps == [1.0]
    b_ids = [body["request_id"] for host, _, path, body, _ in server.calls if host == "b"]
    assert b_ids == ["rid-1of2", "rid-1of2"]  # the retry kept the shard's id


def test_replicas_raise_conflicts_and_rate_limits_by_type(replicas) -> None:
    server = FakeServer(routes={("b", "/v1/rollouts"): conflict("request_id")})
    with replicas(server) as client, pytest.raises(ConflictError) as info:
        client.rollouts(prompts=PROMPTS, request_id="rid")
    assert info.value.request_id == "rid"

    server = FakeServer(routes={("b", "/v1/espo/commit"): overloaded("1")})
    with replicas(server, max_retries=0) as client, pytest.raises(BroadcastError) as broadcast:
        client.commit("batch")
    assert broadcast.value.succeeded == ("http://a",)
    assert isinstance(broadcast.value.failed["http://b"], RateLimitError)


# ---------------------------------------------------------------------------------------------
# The real app and service answering them (a scripted engine: no vLLM)
# ---------------------------------------------------------------------------------------------


class RecordingTransport(httpx.ASGITransport):
    """The app over ASGI, recording the status of every answer."""

    def __init__(self, app) -> None:
        super().__init__(app=app)
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait (polling the event loop) until `condition` holds; fail after a generous `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_the_servers_backpressure_is_retried_until_there_is_room() -> None:
    engine = GatedEngine(length=3, delay=0.0)
    svc = service(engine, FakeCritic(), max_inflight_trajectories=2)
    app = build_app(svc.config)
    app.state.service = svc
    transport = RecordingTransport(app)

    async def go():
        async with AsyncEspoClient(
            base_url="http://espo", transport=transport, backoff=0.0, backoff_max=0.01, max_retries=100_000
        ) as client:
            body = {"n": 2, "max_tokens": 3, "stop_rule": "none"}
            first = asyncio.ensure_future(client.rollouts(prompts=[[5, 6]], **body))
            await until(lambda: svc.admission.inflight == 2)  # the server is full
            second = asyncio.ensure_future(client.rollouts(prompts=[[7, 8]], **body))
            await until(lambda: 429 in transport.statuses)
            assert not second.done()  # being retried
            engine.release.set()
            return await first, await second

    first, second = asyncio.run(go())
    assert len(first.trajectories) == len(second.trajectories) == 2
    assert transport.statuses[-1] == 200 and transport.statuses.count(429) >= 1
    assert set(transport.statuses) == {200, 429}


def test_the_servers_429_and_409_reach_the_caller_typed() -> None:
    engine = GatedEngine(length=3, delay=0.0)
    svc = service(engine, FakeCritic(), max_inflight_trajectories=2)
    app = build_app(svc.config)
    app.state.service = svc

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with AsyncEspoClient(base_url="http://espo", transport=transport, max_retries=0) as client:
            body = {"n": 2, "max_tokens": 3, "stop_rule": "none"}
            first = asyncio.ensure_future(client.rollouts(prompts=[[5, 6]], request_id="one", **body))
            await until(lambda: svc.admission.inflight == 2)
            with pytest.raises(RateLimitError) as limited:
                await client.rollouts(prompts=[[7, 8]], **body)
            with pytest.raises(ConflictError) as reused:  # the same id with another body
                await client.rollouts(prompts=[[7, 8]], request_id="one", **body)
            engine.release.set()
            await first
            svc.admission.draining = True
            with pytest.raises(ServiceUnavailableError):  # and a 503 is still a 503
                await client.rollouts(prompts=[[7, 8]], **body)
            return limited.value, reused.value

    limited, reused = asyncio.run(go())
    assert limited.status_code == 429 and limited.type == "overloaded" and limited.retry_after == 2.0
    assert reused.status_code == 409 and reused.param == "request_id" and reused.request_id == "one"
