"""`load_critic_weights` through both client drivers and both replica flavours (fake servers)."""

from __future__ import annotations

import json

import httpx
import pytest

from espo_client import BadRequestError, BroadcastError, EspoError
from tests.fake_server import FakeServer, envelope


def critic_push(version_of: dict[str, int]):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        version = body.get("version", version_of[request.url.host])
        return httpx.Response(200, json={"critic_version": version, "load_time_s": 1.5})

    return handler


def routes(hosts: str, version_of: dict[str, int]) -> dict:
    return {(host, "/v1/critic/weights"): critic_push(version_of) for host in hosts}


def test_load_critic_weights(connect) -> None:
    server = FakeServer(routes=routes("a", {"a": 4}))
    with connect(server) as client:
        assert client.load_critic_weights("/critic/v4").critic_version == 4
        assert client.load_critic_weights("/critic/v9", version=9).critic_version == 9
    bodies = [(method, path, body) for _, method, path, body, _ in server.calls]
    assert bodies == [
        ("POST", "/v1/critic/weights", {"path": "/critic/v4"}),
        ("POST", "/v1/critic/weights", {"path": "/critic/v9", "version": 9}),
    ]


def test_a_refused_critic_push_is_an_invalid_request_error_naming_the_field(connect) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return envelope(400, "does not match the served critic", "invalid_request_error", "path")

    server = FakeServer(routes={("a", "/v1/critic/weights"): refuse})
    with connect(server) as client, pytest.raises(BadRequestError) as info:
        client.load_critic_weights("/critic/bad")
    assert info.value.param == "path" and "does not match" in str(info.value)
    assert len(server.calls) == 1  # a 400 is never retried


def test_critic_pushes_are_broadcast(replicas) -> None:
    server = FakeServer(routes=routes("ab", {"a": 2, "b": 3}))
    with replicas(server) as client:
        answer = client.load_critic_weights("/critic", version=5)
        assert answer.critic_version == 5 and answer.load_time_s == 1.5
        with pytest.raises(EspoError, match="different critic versions"):
            client.load_critic_weights("/critic")
    hosts = sorted(host for host, _, path, _, _ in server.calls if path == "/v1/critic/weights")
    assert hosts == ["a", "a", "b", "b"]


def test_a_critic_push_failing_on_one_replica_names_both_sides(replicas) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return envelope(400, "no such directory", "invalid_request_error", "path")

    server = FakeServer(routes={**routes("a", {"a": 1}), ("b", "/v1/critic/weights"): down})
    with replicas(server) as client, pytest.raises(BroadcastError) as info:
        client.load_critic_weights("/critic", version=1)
    assert info.value.succeeded == ("http://a",) and list(info.value.failed) == ["http://b"]
    assert "http://a serve the new critic; http://b keep the old critic" in str(info.value)
