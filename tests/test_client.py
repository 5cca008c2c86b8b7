"""espo_client's HTTP clients against an in-process fake server (httpx.MockTransport): no network.

Most tests run twice, once per driver: `connect` gives an `EspoClient`, or an `AsyncEspoClient`
behind `Blocking` (each call run to completion on one event loop), so one test body exercises the
sync and the async driver of the same core. `replicas` does the same for `Replicas` (the blocking
flavour, on its own event loop thread) and `AsyncReplicas`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import asdict

import httpx
import pytest

from espo_client import (
    AsyncEspoClient,
    AsyncReplicas,
    BadRequestError,
    BroadcastError,
    ConnectError,
    EspoClient,
    EspoError,
    RequestTimeoutError,
    RolloutRequest,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from espo_client._core import Operation, Send, Sleep, rollout_request
from espo_client.protocol import EspoState, RolloutResponse
from tests.fake_server import (
    PROMPTS,
    Body,
    FakeServer,
    Handler,
    connect_error,
    envelope,
    fake_rollout,
    unavailable,
)

# ---------------------------------------------------------------------------------------------
# Retries, idempotency, errors
# ---------------------------------------------------------------------------------------------


def test_retries_connect_errors_and_503_with_the_same_request_id(connect, sleeps) -> None:
    server = FakeServer([connect_error, unavailable])
    with connect(server, max_retries=2) as client:
        response = client.rollouts(prompts=[[10, 1]], n=2)
    bodies = server.rollout_bodies()
    assert len(bodies) == 3 and sleeps == [0.0, 0.0]
    ids = {body["request_id"] for body in bodies}
    assert len(ids) == 1 and ids == {response.request_id} and len(response.request_id) >= 32
    assert len(response.trajectories) == 2


def test_retry_waits_honour_retry_after_and_backoff(connect, sleeps) -> None:
    def unavailable_for(seconds: str) -> Handler:
        return lambda request: httpx.Response(503, headers={"Retry-After": seconds}, json={})

    server = FakeServer([unavailable_for("2"), unavailable_for("30"), unavailable_for("a date")])
    with connect(server, max_retries=3, backoff=1.0, backoff_max=8.0) as client:
        client.health()
    assert len(server.calls) == 4
    first, capped, own = sleeps
    assert first == 2.0  # the server's Retry-After beats our shorter backoff (0.5-1 s)
    assert capped == 8.0  # but never beyond backoff_max
    assert 2.0 <= own <= 4.0  # an HTTP date: our own backoff, 4 s jittered to 50-100%


def test_core_retry_resends_the_same_request() -> None:
    """The retry policy without any I/O: drive the operation by hand."""
    client = EspoClient(base_url="http://a", backoff=0.0)
    op = Operation(client._rollouts_op(rollout_request(None, {"prompts": [[1]]})))
    send = op.advance()
    assert isinstance(send, Send) and not send.stream
    sleep = op.advance(httpx.Response(503, request=send.request, headers={"Retry-After": "1"}))
    assert isinstance(sleep, Sleep) and sleep.seconds == 1.0
    again = op.advance()
    assert isinstance(again, Send) and again.request is send.request  # the same body and request_id
    with pytest.raises(BadRequestError):
        op.advance(httpx.Response(400, request=send.request, json={}))  # 4xx: never retried


def test_caller_request_id_is_kept_and_each_call_gets_a_new_one(connect) -> None:
    server = FakeServer()
    with connect(server) as client:
        assert client.rollouts(prompts=[[10]], request_id="mine").request_id == "mine"
        first, second = client.rollouts(prompts=[[10]]), client.rollouts(prompts=[[10]])
    assert first.request_id != second.request_id


def test_gives_up_after_max_retries(connect) -> None:
    server = FakeServer([unavailable] * 3)
    with connect(server, max_retries=2) as client, pytest.raises(ServiceUnavailableError) as info:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 3
    assert info.value.status_code == 503 and info.value.message == "engine is restarting"
    assert info.value.request_id == server.rollout_bodies()[0]["request_id"]  # for the caller's own retry

    server = FakeServer([connect_error] * 2)
    with connect(server, max_retries=1) as client, pytest.raises(ConnectError) as connect_info:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 2
    assert isinstance(connect_info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (401, BadRequestError), (422, BadRequestError), (500, ServerError)],
)
def test_no_retry_on_4xx_and_other_5xx(connect, status: int, cls: type) -> None:
    server = FakeServer([lambda request: envelope(status, "n must be <= 16", "invalid_request", "n")] * 3)
    with connect(server, max_retries=3) as client, pytest.raises(cls) as info:
        client.rollouts(prompts=[[10]], n=4)
    assert len(server.calls) == 1
    error = info.value
    assert (error.status_code, error.message, error.type, error.param, error.code) == (
        status,
        "n must be <= 16",
        "invalid_request",
        "n",
        status,
    )
    assert str(error) == f"{status} invalid_request: n must be <= 16 (param: n)"
    assert error.response.status_code == status


def test_error_body_that_is_not_an_envelope(connect) -> None:
    server = FakeServer([lambda request: httpx.Response(502, text="<html>bad gateway</html>")])
    with connect(server) as client, pytest.raises(ServerError, match="bad gateway"):
        client.info()


def test_read_timeout_is_a_transport_error_and_not_retried(connect) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    server = FakeServer([timeout] * 3)
    with connect(server, max_retries=3) as client, pytest.raises(RequestTimeoutError) as info:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 1
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert info.value.url == "http://a/v1/rollouts"


def test_bearer_token_and_default_timeout(connect) -> None:
    server = FakeServer()
    with connect(server, api_key="sekret") as client:
        client.health()
        assert client.timeout.connect == 10.0 and client.timeout.read == 600.0
    request = server.calls[0][4]
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["user-agent"].startswith("espo-client")
    assert request.extensions["timeout"]["read"] == 600.0  # what the transport is told

    server = FakeServer()
    with connect(server) as client:
        client.health()
    assert "authorization" not in server.calls[0][4].headers


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPO_BASE_URL", "http://env:8000/")
    monkeypatch.setenv("ESPO_API_KEY", "from-env")
    client = EspoClient()
    assert (client.base_url, client.api_key) == ("http://env:8000", "from-env")
    monkeypatch.setenv("ESPO_BASE_URL", "http://a,http://b")
    with pytest.raises(ValueError, match="replicas"):
        AsyncEspoClient()
    assert AsyncReplicas().base_urls == ("http://a", "http://b")
    monkeypatch.delenv("ESPO_BASE_URL")
    with pytest.raises(ValueError):
        EspoClient()
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        AsyncEspoClient(base_url="http://a", transport=httpx.HTTPTransport())


def test_request_building(connect) -> None:
    server = FakeServer()
    with connect(server) as client:
        client.rollouts(
            prompts=[[10, 2], "a text", {"token_ids": [12]}], n=2, stop_rule="espo", rule_params={"tau": 0.3}
        )
        with pytest.raises(TypeError):
            client.rollouts(RolloutRequest(prompts=[{"token_ids": [1]}]), n=2)
        with pytest.raises(ValueError):  # pydantic: unknown field, before any I/O
            client.rollouts(prompts=[[1]], max_token=5)
        client.set_state({"beta": 3.0})
        client.commit("batch-1")
    body = server.rollout_bodies()[0]
    assert body["prompts"] == [{"token_ids": [10, 2]}, {"text": "a text"}, {"token_ids": [12]}]
    assert body["stop_rule"] == "espo" and body["rule_params"] == {"tau": 0.3}
    assert "state" not in body and "seed" not in body  # None fields are left to the server's defaults
    (_, put, _, state, _), (_, post, _, commit, _) = server.calls[1:]
    assert (put, state["beta"], post, commit) == ("PUT", 3.0, "POST", {"batch_id": "batch-1"})


def test_ready_raises_when_not_ready_without_retrying(connect) -> None:
    not_ready = httpx.Response(503, json={"status": "not_ready", "detail": {"critic": "unreachable"}})
    server = FakeServer([lambda request: not_ready])
    with connect(server, max_retries=3) as client, pytest.raises(ServiceUnavailableError, match="critic"):
        client.ready()
    assert len(server.calls) == 1


def test_wait_ready_polls_until_ready(connect, sleeps) -> None:
    server = FakeServer([connect_error, unavailable])
    with connect(server, max_retries=0) as client:
        client.wait_ready(timeout=60, interval=0.5)
    assert [path for _, _, path, _, _ in server.calls] == ["/readyz"] * 3 and sleeps == [0.5, 0.5]
    server = FakeServer([unavailable] * 3)
    with connect(server) as client, pytest.raises(ServiceUnavailableError):
        client.wait_ready(timeout=0, interval=0.5)


# ---------------------------------------------------------------------------------------------
# NDJSON streaming
# ---------------------------------------------------------------------------------------------


def stream_server(lines: list[object]) -> FakeServer:
    content = b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
    return FakeServer([lambda request: httpx.Response(200, content=content)])


def test_stream_yields_trajectories_and_the_final_response(connect) -> None:
    server = FakeServer()
    with connect(server) as client, client.stream_rollouts(prompts=PROMPTS[:2], n=2) as stream:
        seen = [(t.prompt_index, t.sample_index) for t in stream]
    assert seen == [(1, 1), (1, 0), (0, 1), (0, 0)]  # as the server sent them
    _, _, _, body, request = server.calls[0]
    assert request.url.params["stream"] == "true" and body["request_id"] == stream.request_id
    assert request.headers["accept"] == "application/x-ndjson"
    response = stream.response
    assert [(t.prompt_index, t.sample_index) for t in response.trajectories] == sorted(seen)
    assert response.usage.trajectories == 4 and response.request_id == stream.request_id
    assert all(body.closed for body in server.bodies)


def test_stream_group_events_give_whole_groups_as_they_complete(connect) -> None:
    whole = fake_rollout({"prompts": [{"token_ids": [10]}, {"token_ids": [11]}], "n": 2, "request_id": "r"})
    by_prompt = {p: [t for t in whole["trajectories"] if t["prompt_index"] == p] for p in (0, 1)}
    lines = [
        *({"type": "trajectory", "trajectory": t} for t in by_prompt[1]),
        {"type": "group", "prompt_index": 1, "sample_count": 2},
        *({"type": "trajectory", "trajectory": t} for t in by_prompt[0]),
        {"type": "group", "prompt_index": 0, "sample_count": 2},
        {"type": "done", "response": {**whole, "trajectories": []}},
    ]
    content = b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"
    stream_body = Body(content)
    server = FakeServer([lambda request: httpx.Response(200, stream=stream_body)])
    groups: list[list[tuple[int, int]]] = []
    with (
        connect(server) as client,
        client.stream_rollouts(prompts=[[10], [11]], n=2, request_id="r") as stream,
    ):
        for _ in stream:
            groups += [[(t.prompt_index, t.sample_index) for t in g] for g in stream.pop_groups()]
        groups += [[(t.prompt_index, t.sample_index) for t in g] for g in stream.pop_groups()]
    assert groups == [[(1, 0), (1, 1)], [(0, 0), (0, 1)]]
    assert len(stream.response.trajectories) == 4


def test_run_calls(connect) -> None:
    run = {"run_id": "r1", "open": True, "idle_timeout_s": 600.0}
    server = FakeServer(
        [
            lambda request: httpx.Response(200, json=run),
            lambda request: httpx.Response(200, json={**run, "carried_groups": 2}),
            lambda request: httpx.Response(200, json={**run, "open": False, "aborted": 3}),
        ]
    )
    with connect(server) as client:
        assert client.open_run("r1").run_id == "r1"
        assert client.describe_run("r1").carried_groups == 2
        assert client.close_run("r1").aborted == 3
    assert [(method, path) for _, method, path, _, _ in server.calls] == [
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs/r1"),
        ("DELETE", "/v1/runs/r1"),
    ]
    assert server.calls[0][3] == {"run_id": "r1"}


def test_stream_from_a_server_that_answers_json(connect) -> None:
    whole = fake_rollout({"prompts": [{"token_ids": [10]}, {"token_ids": [11]}], "n": 2, "request_id": "r"})
    server = FakeServer([lambda request: httpx.Response(200, json=whole)])
    with connect(server) as client:
        stream = client.stream_rollouts(prompts=[[10], [11]], n=2, request_id="r")
        seen = [(t.prompt_index, t.sample_index) for t in stream]
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert stream.response.model_dump() == RolloutResponse.model_validate(whole).model_dump()


def test_stream_parser_skips_blank_lines_and_unknown_events(connect) -> None:
    full = fake_rollout({"prompts": [{"token_ids": [10]}], "n": 1, "request_id": "r"})
    lines: list[object] = [
        {"type": "trajectory", "trajectory": full["trajectories"][0]},
        b"",
        {"type": "heartbeat"},
        {"type": "done", "response": {**full, "trajectories": []}},
    ]
    with connect(stream_server(lines)) as client:
        stream = client.stream_rollouts(prompts=[[10]])
        assert len(list(stream)) == 1
        assert stream.response.trajectories[0].token_ids == [10, 0]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            [{"type": "error", "error": {"message": "critic down", "type": "critic_error", "code": 503}}],
            "critic down",
        ),
        ([b"{not json"], "malformed"),
        ([{"trajectory": {}}], "without a type"),
        ([{"type": "trajectory", "trajectory": {"prompt_index": 0}}], "invalid 'trajectory'"),
        ([], "ended before its done line"),
    ],
)
def test_stream_errors(connect, lines: list[object], match: str) -> None:
    with connect(stream_server(lines)) as client, pytest.raises(StreamError, match=match) as info:
        list(client.stream_rollouts(prompts=[[10]], request_id="rid"))
    assert info.value.request_id == "rid"
    if "critic down" in match:
        assert (info.value.code, info.value.type) == (503, "critic_error")


def test_stream_error_status_is_read_and_mapped(connect) -> None:
    server = FakeServer([lambda request: envelope(422, "n must be <= 16", "invalid_request", "n")])
    with connect(server) as client, pytest.raises(BadRequestError) as info:
        list(client.stream_rollouts(prompts=[[10]], n=99))
    assert (info.value.message, info.value.param) == ("n must be <= 16", "n")
    assert len(server.calls) == 1


def test_stream_retries_before_the_first_line(connect) -> None:
    server = FakeServer([unavailable])
    with connect(server) as client:
        stream = client.stream_rollouts(prompts=[[10]], n=2)
        assert len(list(stream)) == 2
        with pytest.raises(RuntimeError):
            client.stream_rollouts(prompts=[[10]]).response  # noqa: B018
    assert len({body["request_id"] for body in server.rollout_bodies()}) == 1 and len(server.calls) == 2


def test_closing_mid_stream_closes_the_response(connect) -> None:
    server = FakeServer()
    with connect(server) as client:
        with client.stream_rollouts(prompts=PROMPTS, n=2) as stream:
            next(stream)
        assert server.bodies[0].closed  # `with` on the stream
        stream = client.stream_rollouts(prompts=PROMPTS, n=2)
        next(stream)
        assert not server.bodies[1].closed
    assert server.bodies[1].closed  # closing the client closes its open streams
    assert list(stream) == []


# ---------------------------------------------------------------------------------------------
# Several replicas
# ---------------------------------------------------------------------------------------------


def test_sharding_keeps_samples_of_a_prompt_together_and_restores_prompt_order(replicas) -> None:
    server = FakeServer()
    with replicas(server, base_urls=["http://a", "http://b/"]) as client:
        response = client.rollouts(prompts=PROMPTS, n=3, seed=100, request_id="rid")
    calls = {host: body for host, _, path, body, _ in server.calls if path == "/v1/rollouts"}
    assert set(calls) == {"a", "b"}
    blocks = sorted((body["prompts"][0]["token_ids"][0], body) for body in calls.values())
    (_, first), (_, second) = blocks
    # contiguous blocks; seeds offset so each sample keeps the seed one server would give it
    assert [p["token_ids"] for p in first["prompts"]] == PROMPTS[:2]
    assert [p["token_ids"] for p in second["prompts"]] == PROMPTS[2:]
    assert (first["seed"], second["seed"]) == (100, 100 + 2 * 3)
    assert {first["request_id"], second["request_id"]} == {"rid-0of2", "rid-1of2"}

    assert response.request_id == "rid"
    assert [(t.prompt_index, t.sample_index) for t in response.trajectories] == [
        (i, j) for i in range(len(PROMPTS)) for j in range(3)
    ]
    for t in response.trajectories:
        assert t.token_ids[0] == PROMPTS[t.prompt_index][0]
    usage = response.usage
    assert usage.trajectories == 15 and usage.stopped == 5 and usage.generated_tokens == 30
    assert usage.prompt_tokens == sum(map(len, PROMPTS))
    assert usage.critic_time_s == pytest.approx(1.0)
    assert usage.wall_time_s == pytest.approx(4.0)  # the longest shard (3 prompts), not the sum


def test_sharding_rotates_replicas_for_small_calls(replicas) -> None:
    server = FakeServer()
    with replicas(server) as client:
        for _ in range(4):
            response = client.rollouts(prompts=[[10]], n=2, request_id="x")
            assert response.request_id == "x" and [t.prompt_index for t in response.trajectories] == [0, 0]
    assert [host for host, *_ in server.calls] == ["a", "b", "a", "b"]


def test_a_failed_shard_carries_the_callers_request_id(replicas) -> None:
    server = FakeServer(routes={("b", "/v1/rollouts"): lambda request: envelope(400, "no", "invalid")})
    with replicas(server) as client, pytest.raises(BadRequestError) as info:
        client.rollouts(prompts=PROMPTS, request_id="rid")
    assert info.value.request_id == "rid"


@pytest.mark.parametrize("rule", ["espo", "none"])
def test_sharded_learner_owned_state_is_updated_from_all_shards(replicas, rule: str) -> None:
    state = EspoState(mu=0.2, var=0.5, beta=6.0, warm=True, initialised=True, batches=3)
    server = FakeServer()
    with replicas(server) as client:
        response = client.rollouts(prompts=PROMPTS, n=2, state=state, stop_rule=rule)
    single = fake_rollout(
        {
            "prompts": [{"token_ids": p} for p in PROMPTS],
            "n": 2,
            "request_id": "r",
            "state": asdict(state),
            "stop_rule": rule,
        }
    )
    assert response.state_used == state
    assert response.state_after is not None and response.state_after.batches == 4
    # the same as one server with the whole batch (up to the order of float sums)
    assert asdict(response.state_after) == pytest.approx(single["state_after"], rel=1e-12)
    assert response.state_after != response.state_used


def test_broadcasts(replicas) -> None:
    server = FakeServer()
    with replicas(server) as client:
        assert client.load_weights("/w", version=9).policy_version == 9
        with pytest.raises(EspoError, match="different policy versions"):
            client.load_weights("/w")
        client.set_state(EspoState(beta=3.0))
        client.commit("batch-1")
        client.state(replica=1)
        with pytest.raises(IndexError):
            client.state(replica=2)
        client.wait_ready()
    by_path: dict[str, list[str]] = {}
    for host, method, path, _, _ in server.calls:
        by_path.setdefault(f"{method} {path}", []).append(host)
    assert sorted(by_path["POST /v1/weights"]) == ["a", "a", "b", "b"]
    assert sorted(by_path["PUT /v1/espo/state"]) == ["a", "b"]
    assert sorted(by_path["POST /v1/espo/commit"]) == ["a", "b"]
    assert sorted(by_path["GET /readyz"]) == ["a", "b"]
    assert by_path["GET /v1/espo/state"] == ["b"]


def test_load_weights_that_fails_on_some_replicas_names_old_and_new(replicas) -> None:
    server = FakeServer(routes={("c", "/v1/weights"): connect_error})
    with replicas(server, "abc", max_retries=1) as client, pytest.raises(BroadcastError) as info:
        client.load_weights("/w", version=9)
    error = info.value
    assert error.succeeded == ("http://a", "http://b") and list(error.failed) == ["http://c"]
    assert isinstance(error.failed["http://c"], ConnectError) and error.__cause__ is error.failed["http://c"]
    assert "http://a, http://b serve the new weights; http://c are left on the old version" in str(error)
    hosts = sorted(host for host, _, path, _, _ in server.calls if path == "/v1/weights")
    assert hosts == ["a", "b", "c", "c"]  # every replica ran to its end, c with its retry


def test_stream_over_two_replicas(replicas) -> None:
    server = FakeServer()
    with replicas(server) as client:
        with client.stream_rollouts(prompts=PROMPTS, n=2, request_id="rid") as stream:
            seen = sorted((t.prompt_index, t.sample_index, t.token_ids[0]) for t in stream)
    assert seen == [(i, j, PROMPTS[i][0]) for i in range(len(PROMPTS)) for j in range(2)]
    assert stream.request_id == "rid" and stream.response.request_id == "rid"
    assert stream.response.usage.trajectories == 10
    assert [t.prompt_index for t in stream.response.trajectories] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(server.bodies) == 2 and all(body.closed for body in server.bodies)


def test_a_failed_shard_stream_closes_the_others(replicas) -> None:
    error_line = {"type": "error", "error": {"message": "critic down", "type": "critic_error", "code": 503}}
    failing = lambda request: httpx.Response(200, content=json.dumps(error_line).encode())  # noqa: E731
    server = FakeServer(routes={("b", "/v1/rollouts"): failing}, hang=("a",))
    with replicas(server) as client:
        with pytest.raises(StreamError, match="critic down") as info:
            list(client.stream_rollouts(prompts=PROMPTS, request_id="rid"))
        assert info.value.request_id == "rid"
        assert server.bodies[0].closed  # the hanging shard on a


def espo_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("espo")]


@pytest.mark.parametrize("close", ["client", "stream"])
def test_closing_mid_sharded_stream_leaves_nothing_open(replicas, loop, close: str) -> None:
    server = FakeServer(hang=("a", "b"))
    client = replicas(server)
    stream = client.stream_rollouts(prompts=PROMPTS, n=2)
    next(stream)
    next(stream)  # one trajectory from each shard; both now wait for more that never comes
    assert len(server.bodies) == 2 and not any(body.closed for body in server.bodies)
    (client if close == "client" else stream).close()
    assert all(body.closed for body in server.bodies)
    if close == "stream":
        client.close()
    assert espo_threads() == []  # Replicas joined its event loop thread
    assert not asyncio.all_tasks(loop)  # AsyncReplicas left no task behind
    assert list(stream) == []


# ---------------------------------------------------------------------------------------------
# The async API, natively
# ---------------------------------------------------------------------------------------------


def test_async_client_natively() -> None:
    async def main() -> None:
        server = FakeServer([connect_error, unavailable])
        transport = httpx.MockTransport(server)
        async with AsyncEspoClient(base_url="http://a", transport=transport, backoff=0.0) as client:
            response = await client.rollouts(prompts=PROMPTS, n=2, request_id="rid")
            assert [t.token_ids[0] for t in response.trajectories][::2] == [p[0] for p in PROMPTS]
            assert len(server.rollout_bodies()) == 3

            async with client.stream_rollouts(prompts=PROMPTS, n=2) as stream:
                seen = [t async for t in stream]
            assert len(seen) == 10 and stream.response.usage.trajectories == 10

            with pytest.raises(BadRequestError):
                await client.info()  # the fake server has no /v1/info: a 404 envelope

        async with AsyncReplicas(base_urls=["http://a", "http://b"], transport=transport) as sharded:
            async with sharded.stream_rollouts(prompts=PROMPTS, n=2) as stream:
                assert len([t async for t in stream]) == 10
            assert len((await sharded.rollouts(prompts=PROMPTS)).trajectories) == 5

    asyncio.run(main())
