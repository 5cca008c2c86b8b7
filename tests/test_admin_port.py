"""`--admin-port`: the admin routes (weight pushes, state writes, weight files) answer only on the
admin port, every other route on both; a real uvicorn listens on both ports (ports.py). The rollout
app over the real service with the scripted engine of test_rollout_loop, and the critic app over a
stand-in critic."""

from __future__ import annotations

import asyncio
import types

import httpx
import pytest
import uvicorn
from pydantic import ValidationError

from espo_server import ports
from espo_server.app import build_app
from espo_server.cli import build_parser
from espo_server.config import ServerConfig
from espo_server.critic_server import build_critic_app
from espo_server.process import free_port
from tests.fakes import FakeCritic, FakeEngine, service

ADMIN_ROUTES = [
    ("POST", "/v1/weights", {"path": "/nowhere"}),
    ("POST", "/v1/critic/weights", {"path": "/nowhere"}),
    ("PUT", "/v1/espo/state", {"beta": 3.0}),
    ("POST", "/v1/espo/commit", {}),
    ("POST", "/v1/weights/uploads", {}),
    ("GET", "/v1/weights/uploads/u", None),
    ("PUT", "/v1/weights/uploads/u/shards/model-00001.safetensors", None),
    ("POST", "/v1/weights/uploads/u/commit", {}),
    ("DELETE", "/v1/weights/uploads/u", None),
    ("POST", "/v1/critic/weights/uploads", {}),
    ("GET", "/v1/weights/files", None),  # what a replica that joins copies: the learner's weights
    ("GET", "/v1/weights/files/model.safetensors", None),
    ("GET", "/v1/critic/weights/files", None),
]


def rollout_app(**config):
    svc = service(FakeEngine(length=3, delay=0.0), FakeCritic(), **config)
    app = build_app(svc.config)
    app.state.service = svc
    return app


async def call(http: httpx.AsyncClient, method: str, url: str, body: dict | None = None) -> httpx.Response:
    return await http.request(method, url, json=body, timeout=30)


def test_admin_routes_answer_only_on_the_admin_port() -> None:
    app = rollout_app(port=8000, admin_port=8080)

    async def go() -> None:
        # (the fake critic takes no pushes: its route answers 503, the app's answer to any exception)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport) as http:
            for method, path, body in ADMIN_ROUTES:
                public = await call(http, method, "http://espo:8000" + path, body)
                assert public.status_code == 403, (path, public.text)
                error = public.json()["error"]
                assert error["type"] == "permission_error" and "admin port (8080)" in error["message"]
                admin = await call(http, method, "http://espo:8080" + path, body)
                assert "admin port" not in admin.text, (path, admin.text)  # the route's own answer
            assert (
                await call(http, "PUT", "http://espo:8080/v1/espo/state", {"beta": 3.0})
            ).status_code == 200
            rollout = {"prompts": [{"token_ids": [5, 6]}], "n": 2, "max_tokens": 3, "stop_rule": "none"}
            for port in (8000, 8080):  # everything else answers on both
                base = f"http://espo:{port}"
                assert (await call(http, "POST", base + "/v1/rollouts", rollout)).status_code == 200
                assert (await call(http, "GET", base + "/v1/espo/state")).json()["state"]["beta"] == 3.0
                for path in ("/v1/info", "/healthz", "/metrics"):
                    assert (await call(http, "GET", base + path)).status_code == 200, path

    asyncio.run(go())


def test_without_an_admin_port_every_route_answers_on_the_one_port() -> None:
    app = rollout_app(port=8000)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            answer = await call(http, "PUT", "http://espo:8000/v1/espo/state", {"beta": 3.0})
            assert answer.status_code == 200, answer.text

    asyncio.run(go())


class StandInCritic:
    """What build_critic_app reads of an InProcessCritic (no engine: only the push route is called)."""

    model = "stand-in"
    version = 0
    weights_dir = "stand-in"
    prefix_caching = True
    block_size = 32
    llm = types.SimpleNamespace(
        model_config=types.SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 100)
    )


def test_the_critic_push_answers_only_on_the_critics_admin_port() -> None:
    app = build_critic_app(StandInCritic(), weights_dir=[], admin_port=8081)  # type: ignore[arg-type]

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            public = await call(http, "POST", "http://critic:8001/v1/critic/weights", {"path": "/x"})
            admin = await call(http, "POST", "http://critic:8081/v1/critic/weights", {"path": "/x"})
            metrics = await call(http, "GET", "http://critic:8001/metrics")
            return public, admin, metrics

    public, admin, metrics = asyncio.run(go())
    assert public.status_code == 403 and "admin port (8081)" in public.json()["error"]["message"]
    assert admin.status_code == 403 and "--weights-dir" in admin.json()["error"]["message"]  # its own check
    assert metrics.status_code == 200 and "espo_critic_version" in metrics.text
    assert "espo_policy_version" not in metrics.text  # the rollout server's series are not the critic's


def test_a_real_uvicorn_listens_on_both_ports() -> None:
    port, admin_port = free_port(), free_port()
    app = rollout_app(port=port, admin_port=admin_port)

    async def go() -> dict[str, int]:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.ensure_future(ports.serve(server, admin_port))
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while not server.started:
                assert not serving.done() and asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient() as http:
                answers = {}
                for where, p in (("public", port), ("admin", admin_port)):
                    url = f"http://127.0.0.1:{p}"
                    answers[where] = (
                        await call(http, "PUT", url + "/v1/espo/state", {"beta": 2.0})
                    ).status_code
                    answers[where + " health"] = (await call(http, "GET", url + "/healthz")).status_code
                return answers
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 30)

    answers = asyncio.run(go())
    assert answers == {"public": 403, "public health": 200, "admin": 200, "admin health": 200}


def test_the_setting() -> None:
    assert ServerConfig().admin_port is None
    assert ServerConfig(admin_port=8080).admin_port == 8080
    for clash in ({"port": 8080}, {"grpc_port": 8080}):
        with pytest.raises(ValidationError, match="admin_port"):
            ServerConfig(admin_port=8080, **clash)
    serve = build_parser().parse_args(["serve", "--admin-port", "8080"])
    critic = build_parser().parse_args(["critic", "--model", "m", "--admin-port", "8081"])
    assert (serve.admin_port, critic.admin_port) == (8080, 8081)
