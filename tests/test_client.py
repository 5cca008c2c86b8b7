"""espo_client's HTTP clients against an in-process fake server (httpx.MockTransport): no network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict

import httpx
import pytest

from espo_client import (
    AsyncEspoClient,
    BadRequestError,
    ConnectError,
    EspoClient,
    EspoError,
    Replicas,
    RequestTimeoutError,
    RolloutRequest,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from espo_client.protocol import EspoState, RolloutResponse
from espo_client.stop_rule import BatchStats, EspoParams, update_state

# ---------------------------------------------------------------------------------------------
# A fake server: answers from the request alone, and records every request it saw
# ---------------------------------------------------------------------------------------------

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
    stats = BatchStats(regret_tokens, regret_sum, regret_sumsq, n_traj, n_stop)
    after = update_state(
        state,
        stats,
        EspoParams().with_overrides({k: v for k, v in RULE_PARAMS.items() if v is not None}),
    )
    return {
        "request_id": body["request_id"],
        "trajectories": trajectories,
        "usage": usage,
        "stop_rule": body.get("stop_rule", "none"),
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


class FakeServer:
    """Records (host, method, path, body) and answers; `script` may override the first answers."""

    def __init__(self, script: list[Callable[[httpx.Request], httpx.Response]] | None = None) -> None:
        self.calls: list[tuple[str, str, str, dict | None, httpx.Request]] = []
        self.script = list(script or [])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.url.host, request.method, request.url.path, body, request))
        if self.script:
            return self.script.pop(0)(request)
        if request.url.path == "/v1/rollouts":
            response = fake_rollout(body)
            if request.url.params.get("stream") == "true":
                return httpx.Response(
                    200, content=ndjson(response), headers={"content-type": "application/x-ndjson"}
                )
            return httpx.Response(200, json=response)
        if request.url.path == "/v1/weights":
            version = body.get("version") or (7 if request.url.host == "a" else 8)
            return httpx.Response(200, json={"policy_version": version, "load_time_s": 2.0})
        if request.url.path in ("/v1/espo/state", "/v1/espo/commit"):
            state = body if request.method == "PUT" else asdict(EspoState())
            return httpx.Response(200, json={"state": state})
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        return envelope(404, f"no route {request.url.path}", "not_found")

    def rollout_bodies(self) -> list[dict]:
        return [body for _, _, path, body, _ in self.calls if path == "/v1/rollouts"]


def client_for(server: FakeServer, **kwargs) -> EspoClient:
    kwargs.setdefault("base_url", "http://a")
    return EspoClient(transport=httpx.MockTransport(server), backoff=0.0, **kwargs)


def replicas_for(server: FakeServer, base_urls: list[str]) -> Replicas:
    return Replicas(base_urls=base_urls, transport=httpx.MockTransport(server), backoff=0.0)


def connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def unavailable(request: httpx.Request) -> httpx.Response:
    return envelope(503, "engine is restarting", "service_unavailable")


PROMPTS = [[10, 1], [11, 1, 2], [12], [13, 5], [14]]

# ---------------------------------------------------------------------------------------------
# Retries, idempotency, errors
# ---------------------------------------------------------------------------------------------


def test_retries_connect_errors_and_503_with_the_same_request_id() -> None:
    server = FakeServer([connect_error, unavailable])
    with client_for(server, max_retries=2) as client:
        response = client.rollouts(prompts=[[10, 1]], n=2)
    bodies = server.rollout_bodies()
    assert len(bodies) == 3
    ids = {body["request_id"] for body in bodies}
    assert len(ids) == 1 and ids == {response.request_id} and len(response.request_id) >= 32
    assert len(response.trajectories) == 2


def test_caller_request_id_is_kept_and_each_call_gets_a_new_one() -> None:
    server = FakeServer()
    with client_for(server) as client:
        assert client.rollouts(prompts=[[10]], request_id="mine").request_id == "mine"
        first, second = client.rollouts(prompts=[[10]]), client.rollouts(prompts=[[10]])
    assert first.request_id != second.request_id


def test_gives_up_after_max_retries() -> None:
    server = FakeServer([unavailable] * 3)
    with client_for(server, max_retries=2) as client, pytest.raises(ServiceUnavailableError) as info:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 3
    assert info.value.status_code == 503 and info.value.message == "engine is restarting"
    assert info.value.request_id == server.rollout_bodies()[0]["request_id"]  # for the caller's own retry

    server = FakeServer([connect_error] * 2)
    with client_for(server, max_retries=1) as client, pytest.raises(ConnectError) as connect:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 2
    assert isinstance(connect.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (401, BadRequestError), (422, BadRequestError), (500, ServerError)],
)
def test_no_retry_on_4xx_and_other_5xx(status: int, cls: type) -> None:
    server = FakeServer([lambda request: envelope(status, "n must be <= 16", "invalid_request", "n")] * 3)
    with client_for(server, max_retries=3) as client, pytest.raises(cls) as info:
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


def test_error_body_that_is_not_an_envelope() -> None:
    server = FakeServer([lambda request: httpx.Response(502, text="<html>bad gateway</html>")])
    with client_for(server) as client, pytest.raises(ServerError, match="bad gateway"):
        client.info()


def test_read_timeout_is_a_transport_error_and_not_retried() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    server = FakeServer([timeout] * 3)
    with client_for(server, max_retries=3) as client, pytest.raises(RequestTimeoutError) as info:
        client.rollouts(prompts=[[10]])
    assert len(server.calls) == 1
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert info.value.url == "http://a/v1/rollouts"


def test_bearer_token_and_default_timeout() -> None:
    server = FakeServer()
    with client_for(server, api_key="sekret") as client:
        client.health()
        assert client.timeout.connect == 10.0 and client.timeout.read == 600.0
    request = server.calls[0][4]
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["user-agent"].startswith("espo-client")

    server = FakeServer()
    with client_for(server) as client:
        client.health()
    assert "authorization" not in server.calls[0][4].headers


def test_request_building() -> None:
    server = FakeServer()
    with client_for(server) as client:
        client.rollouts(
            prompts=[[10, 2], "a text", {"token_ids": [12]}], n=2, stop_rule="espo", rule_params={"tau": 0.3}
        )
        with pytest.raises(TypeError):
            client.rollouts(RolloutRequest(prompts=[{"token_ids": [1]}]), n=2)
        with pytest.raises(ValueError):  # pydantic: unknown field, before any I/O
            client.rollouts(prompts=[[1]], max_token=5)
    body = server.rollout_bodies()[0]
    assert body["prompts"] == [{"token_ids": [10, 2]}, {"text": "a text"}, {"token_ids": [12]}]
    assert body["stop_rule"] == "espo" and body["rule_params"] == {"tau": 0.3}
    assert "state" not in body and "seed" not in body  # None fields are left to the server's defaults
    assert len(server.calls) == 1


def test_ready_raises_when_not_ready_without_retrying() -> None:
    not_ready = httpx.Response(503, json={"status": "not_ready", "detail": {"critic": "unreachable"}})
    server = FakeServer([lambda request: not_ready])
    with client_for(server, max_retries=3) as client, pytest.raises(ServiceUnavailableError, match="critic"):
        client.ready()
    assert len(server.calls) == 1


# ---------------------------------------------------------------------------------------------
# Several replicas
# ---------------------------------------------------------------------------------------------


def test_sharding_keeps_samples_of_a_prompt_together_and_restores_prompt_order() -> None:
    server = FakeServer()
    with replicas_for(server, ["http://a", "http://b/"]) as client:
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


def test_sharding_rotates_replicas_for_small_calls() -> None:
    server = FakeServer()
    with replicas_for(server, ["http://a", "http://b"]) as client:
        for _ in range(4):
            response = client.rollouts(prompts=[[10]], n=2, request_id="x")
            assert response.request_id == "x" and [t.prompt_index for t in response.trajectories] == [0, 0]
    assert [host for host, *_ in server.calls] == ["a", "b", "a", "b"]


def test_sharded_learner_owned_state_is_updated_from_all_shards() -> None:
    state = EspoState(mu=0.2, var=0.5, beta=6.0, warm=True, initialised=True, batches=3)
    server = FakeServer()
    with replicas_for(server, ["http://a", "http://b"]) as client:
        response = client.rollouts(prompts=PROMPTS, n=2, state=state)
    single = fake_rollout(
        {
            "prompts": [{"token_ids": p} for p in PROMPTS],
            "n": 2,
            "request_id": "r",
            "state": asdict(state),
        }
    )
    assert response.state_used == state
    assert response.state_after is not None and response.state_after.batches == 4
    # the same as one server with the whole batch (up to the order of float sums)
    assert asdict(response.state_after) == pytest.approx(single["state_after"], rel=1e-12)
    assert response.state_after != response.state_used


def test_broadcasts() -> None:
    server = FakeServer()
    with replicas_for(server, ["http://a", "http://b"]) as client:
        assert client.load_weights("/w", version=9).policy_version == 9
        with pytest.raises(EspoError, match="different policy versions"):
            client.load_weights("/w")
        client.set_state(EspoState(beta=3.0))
        client.commit("batch-1")
        client.state(replica=1)
        with pytest.raises(IndexError):
            client.state(replica=2)
    by_path: dict[str, list[str]] = {}
    for host, method, path, _, _ in server.calls:
        by_path.setdefault(f"{method} {path}", []).append(host)
    assert sorted(by_path["POST /v1/weights"]) == ["a", "a", "b", "b"]
    assert sorted(by_path["PUT /v1/espo/state"]) == ["a", "b"]
    assert sorted(by_path["POST /v1/espo/commit"]) == ["a", "b"]
    assert by_path["GET /v1/espo/state"] == ["b"]


# ---------------------------------------------------------------------------------------------
# NDJSON streaming
# ---------------------------------------------------------------------------------------------


def stream_server(lines: list[object]) -> FakeServer:
    content = b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
    return FakeServer([lambda request: httpx.Response(200, content=content)])


def test_stream_yields_trajectories_and_the_final_response() -> None:
    server = FakeServer()
    with client_for(server) as client, client.stream_rollouts(prompts=PROMPTS[:2], n=2) as stream:
        seen = [(t.prompt_index, t.sample_index) for t in stream]
    assert seen == [(1, 1), (1, 0), (0, 1), (0, 0)]  # as the server sent them
    _, _, _, body, request = server.calls[0]
    assert request.url.params["stream"] == "true" and body["request_id"] == stream.request_id
    response = stream.response
    assert [(t.prompt_index, t.sample_index) for t in response.trajectories] == sorted(seen)
    assert response.usage.trajectories == 4 and response.request_id == stream.request_id


def test_stream_parser_skips_blank_lines_and_unknown_events() -> None:
    full = fake_rollout({"prompts": [{"token_ids": [10]}], "n": 1, "request_id": "r"})
    lines: list[object] = [
        {"type": "trajectory", "trajectory": full["trajectories"][0]},
        b"",
        {"type": "heartbeat"},
        {"type": "done", "response": {**full, "trajectories": []}},
    ]
    with client_for(stream_server(lines)) as client:
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
def test_stream_errors(lines: list[object], match: str) -> None:
    with client_for(stream_server(lines)) as client, pytest.raises(StreamError, match=match) as info:
        list(client.stream_rollouts(prompts=[[10]]))
    if "critic down" in match:
        assert (info.value.code, info.value.type) == (503, "critic_error")


def test_stream_retries_before_the_first_line() -> None:
    server = FakeServer([unavailable])
    with client_for(server) as client:
        stream = client.stream_rollouts(prompts=[[10]], n=2)
        assert len(list(stream)) == 2
    assert len({body["request_id"] for body in server.rollout_bodies()}) == 1 and len(server.calls) == 2
    with pytest.raises(RuntimeError):
        client_for(server).stream_rollouts(prompts=[[10]]).response  # noqa: B018


def test_stream_over_two_replicas() -> None:
    server = FakeServer()
    with replicas_for(server, ["http://a", "http://b"]) as client:
        with client.stream_rollouts(prompts=PROMPTS, n=2) as stream:
            seen = sorted((t.prompt_index, t.sample_index, t.token_ids[0]) for t in stream)
    assert seen == [(i, j, PROMPTS[i][0]) for i in range(len(PROMPTS)) for j in range(2)]
    assert stream.response.usage.trajectories == 10
    assert [t.prompt_index for t in stream.response.trajectories] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# ---------------------------------------------------------------------------------------------
# The async twin
# ---------------------------------------------------------------------------------------------


def test_async_client() -> None:
    async def main() -> None:
        server = FakeServer([connect_error, unavailable])
        transport = httpx.MockTransport(server)
        async with AsyncEspoClient(base_url="http://a", transport=transport, backoff=0.0) as client:
            response = await client.rollouts(prompts=PROMPTS, n=2, request_id="rid")
            assert [(t.prompt_index, t.token_ids[0]) for t in response.trajectories][::2] == [
                (i, p[0]) for i, p in enumerate(PROMPTS)
            ]
            ids = [body["request_id"] for body in server.rollout_bodies()]
            assert len(ids) == 3 and set(ids) == {"rid"}

            async with client.stream_rollouts(prompts=PROMPTS, n=2) as stream:
                seen = [t async for t in stream]
            assert len(seen) == 10 and stream.response.usage.trajectories == 10
            assert isinstance(stream.response, RolloutResponse)

            with pytest.raises(BadRequestError):
                await client.info()  # the fake server has no /v1/info: a 404 envelope

    asyncio.run(main())
