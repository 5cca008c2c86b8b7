"""The critic at scale on real vLLM engines (CPU, float32): batched queries equal single ones and HF,
prefix caching computes only what is new, critic weight pushes (in process, on `espo-server critic`,
and forwarded by a rollout server during a run), and what a push refuses."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from espo_server import critic_engine
from espo_server.critic import CriticError
from espo_server.critic_engine import InProcessCritic
from espo_server.errors import InvalidRequest
from espo_server.process import CPU_KV_CACHE_BYTES
from espo_server.tiny_model import TinyConfig, make_tiny_models
from tests.live_server import EAGER, PREFIXES, PROMPT, hf_values, metric

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def critics(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The served critic (a), another of the same shape (b), one of another shape, and a policy."""
    root = tmp_path_factory.mktemp("critics")
    _, b = make_tiny_models(root / "b", seed=7)
    _, small = make_tiny_models(root / "small", seed=3, cfg=TinyConfig(hidden_size=64, num_heads=1))
    return {"a": tiny_models["critic"], "b": b, "small": small, "policy": tiny_models["policy"]}


def close(got, want) -> None:
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_inprocess_critic_batches_caches_and_takes_pushes(critics, monkeypatch):
    a, b = critics["a"], critics["b"]
    long = [5 + (i * 7) % 40 for i in range(78)]
    ref_a, ref_b = hf_values(a, [*PREFIXES, long]), hf_values(b, [*PREFIXES, long])

    async def main() -> None:
        async with InProcessCritic.launch(
            str(a),
            kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
            dtype="float32",
            enforce_eager=True,
            cpu_worker="inline",
        ) as critic:
            assert critic.block_size == 32 and critic.version == 0
            # batched == single == HF
            batched = await critic.score(PREFIXES)
            single = [(await critic.score([p])).values[0] for p in PREFIXES]
            close(batched.values, ref_a[:-1])
            np.testing.assert_allclose(batched.values, single, atol=1e-5)
            assert batched.version == 0
            # prefix caching: a longer prefix computes only what the shorter one left in partial blocks
            first = await critic.score([long[:70]])
            second = await critic.score([long])
            assert first.computed_tokens == [70] and second.computed_tokens == [78 - 64]
            close(second.values, ref_a[-1:])

            # a push: new values everywhere, the cached prefix included (the cache was reset)
            version, _ = await critic.load_weights(str(b), None)
            assert version == critic.version == 1
            after = await critic.score([*PREFIXES, long])
            close(after.values, ref_b)
            assert after.version == 1 and after.computed_tokens[-1] == 78

            # refused before anything is touched: the directory, the architecture, the shapes
            for path, words in (
                ("/nonexistent/critic", "not a directory"),
                (str(critics["policy"]), "architectures"),
                (str(critics["small"]), "of another shape or dtype"),
            ):
                with pytest.raises(InvalidRequest, match=words) as caught:
                    await critic.load_weights(path, None)
                assert caught.value.param == "path" and "still serves version 1" in caught.value.message
            close((await critic.score(PREFIXES)).values, ref_b[:-1])

            # the worker checks again before it touches the model (here the server's check is skipped)
            monkeypatch.setattr(critic_engine, "checkpoint_problem", lambda *args: None)
            with pytest.raises(InvalidRequest, match="nothing was changed"):
                await critic.load_weights(str(critics["small"]), None)
            close((await critic.score(PREFIXES)).values, ref_b[:-1])

            # the engine fails half way through a load: rolled back to the weights that served
            real_reload = critic._reload
            calls = []

            async def failing_reload(path: str):
                calls.append(path)
                if len(calls) == 1:
                    await real_reload(path)  # the new weights went in ...
                    raise RuntimeError("engine failed after loading")  # ... and then something broke
                return await real_reload(path)

            monkeypatch.setattr(critic, "_reload", failing_reload)
            with pytest.raises(InvalidRequest, match="rolled back, the critic still serves version 1"):
                await critic.load_weights(str(a), None)
            assert calls == [str(a), str(b)] and critic.version == 1
            close((await critic.score(PREFIXES)).values, ref_b[:-1])
            monkeypatch.setattr(critic, "_reload", real_reload)

            # and back, with an explicit version
            assert (await critic.load_weights(str(a), 5))[0] == 5
            close((await critic.score(PREFIXES)).values, ref_a[:-1])

    asyncio.run(main())


def test_a_rollback_that_fails_says_the_critic_is_down():
    class Broken(InProcessCritic):
        def __init__(self) -> None:  # no engine: only the roll-back logic
            self.weights_dir, self.version = "/old", 3

        async def _reload(self, path: str):
            raise RuntimeError("engine gone")

    error = asyncio.run(Broken()._roll_back("/new", RuntimeError("load failed")))
    assert isinstance(error, CriticError) and "the critic is down" in error.message


def push(server, path: str, **extra) -> httpx.Response:
    return httpx.post(server.url + "/v1/critic/weights", json={"path": path, **extra}, timeout=300)


def check_values(out: dict, critic_dir: Path, version: int) -> int:
    """Every queried value in the traces equals HF of `critic_dir` on its prefix; returns how many."""
    prefixes, got = [], []
    for t in out["trajectories"]:
        assert t["critic_version"] == (version if any(v is not None for v in t["traces"]["values"]) else None)
        for step, value in enumerate(t["traces"]["values"]):
            if value is not None:
                prefixes.append(PROMPT + t["token_ids"][:step])
                got.append(value)
    if prefixes:
        close(got, hf_values(critic_dir, prefixes))
    return len(prefixes)


def rollout_body(seed: int) -> dict:
    return {"prompts": [{"token_ids": PROMPT}], "n": 16, "max_tokens": 160, "seed": seed, "ignore_eos": True,
            "stop_rule": "espo", "shadow": True, "state": EAGER, "include": ["values"]}  # fmt: skip


def test_critic_push_during_a_run_is_forwarded_and_judges_the_next_call(
    rollout_server, critic_server, critics
):
    url = rollout_server.url
    assert httpx.get(url + "/v1/info", timeout=10).json()["critic_version"] == 0
    loads_before = metric(rollout_server, "espo_critic_weight_loads_total", outcome="ok")
    tokens_before = metric(rollout_server, "espo_critic_tokens_total")
    prefix_before = metric(rollout_server, "espo_critic_prefix_tokens_total")
    batches_before = metric(rollout_server, "espo_critic_batch_size_count")
    pushed: dict = {}

    def push_now() -> None:
        pushed["response"] = push(rollout_server, str(critics["b"]), version=1)

    try:
        lines, pusher = [], threading.Thread(target=push_now)
        with httpx.stream("POST", url + "/v1/rollouts?stream=true", json=rollout_body(3), timeout=300) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    if len(lines) == 1:
                        pusher.start()  # the push waits for the running call, if it still runs
        pusher.join(timeout=300)
        assert pushed["response"].status_code == 200, pushed["response"].text
        assert pushed["response"].json()["critic_version"] == 1
        first = {"trajectories": [x["trajectory"] for x in lines if x["type"] == "trajectory"]}
        usage = lines[-1]["response"]["usage"]
        # every value of the first call came from version 0, also those after the push arrived (a
        # query that timed out on a loaded machine has no value, and is flagged)
        assert (
            check_values(first, critics["a"], version=0) == usage["critic_calls"] - usage["critic_errors"] > 0
        )

        second = httpx.post(url + "/v1/rollouts", json=rollout_body(4), timeout=300).json()
        u = second["usage"]
        assert check_values(second, critics["b"], version=1) == u["critic_calls"] - u["critic_errors"] > 0
        assert httpx.get(url + "/v1/info", timeout=10).json()["critic_version"] == 1
        info = httpx.get(critic_server.url + "/v1/info", timeout=10).json()
        assert info["critic_version"] == 1 and info["weights"] == str(critics["b"])
        assert info["prefix_caching"] and info["block_size"] == 32

        # critic tokens: what the critic computed, next to the prefixes it was asked about
        u1, u2 = usage, second["usage"]
        assert 0 < u2["critic_tokens"] <= u2["critic_prefix_tokens"]
        assert (
            metric(rollout_server, "espo_critic_tokens_total") - tokens_before
            == u1["critic_tokens"] + u2["critic_tokens"]
        )
        assert (
            metric(rollout_server, "espo_critic_prefix_tokens_total") - prefix_before
            == u1["critic_prefix_tokens"] + u2["critic_prefix_tokens"]
        )
        assert (
            0
            < metric(rollout_server, "espo_critic_batch_size_count") - batches_before
            <= (u1["critic_calls"] + u2["critic_calls"])
        )
        assert metric(rollout_server, "espo_critic_version") == 1
        assert metric(rollout_server, "espo_critic_weight_loads_total", outcome="ok") - loads_before == 1
    finally:
        r = push(rollout_server, str(critics["a"]), version=2)  # the other tests expect critic a
        assert r.status_code == 200, r.text


def test_critic_pushes_outside_weights_dir_are_403_on_both_servers(rollout_server, critic_server):
    for server in (rollout_server, critic_server):
        r = httpx.post(server.url + "/v1/critic/weights", json={"path": "/etc"}, timeout=60)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["param"] == "path" and "--weights-dir" in r.json()["error"]["message"]


BAD_PUSHES = [
    ({"path": "MISSING"}, "path", "not a directory"),
    ({"path": "POLICY"}, "path", "architectures"),
    ({"path": "SMALL"}, "path", "of another shape or dtype"),
    ({"path": ""}, "path", ""),
    ({"path": "B", "version": -1}, "version", ""),
    ({"path": "B", "bogus": 1}, "bogus", ""),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_PUSHES, ids=[b[1] + ":" + b[2] for b in BAD_PUSHES])
def test_bad_critic_pushes_are_400_and_the_old_critic_serves_on(
    rollout_server, critic_server, critics, body, param, words
):
    missing = critics["a"].parent / "missing"  # inside --weights-dir, but no directory
    names = {"POLICY": critics["policy"], "SMALL": critics["small"], "B": critics["b"], "MISSING": missing}
    body = {k: str(names.get(v, v)) if k == "path" else v for k, v in body.items()}
    version = httpx.get(rollout_server.url + "/v1/info", timeout=10).json()["critic_version"]
    serving = Path(httpx.get(critic_server.url + "/v1/info", timeout=10).json()["weights"])
    rejected = metric(rollout_server, "espo_critic_weight_loads_total", outcome="rejected")
    for server in (rollout_server, critic_server):  # forwarded, or straight to the critic
        r = httpx.post(server.url + "/v1/critic/weights", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
    if words:
        assert f"still serves version {version}" in error["message"]
        assert metric(rollout_server, "espo_critic_weight_loads_total", outcome="rejected") == rejected + 1
    out = httpx.post(rollout_server.url + "/v1/rollouts", json=rollout_body(5), timeout=300).json()
    assert check_values(out, serving, version=version) > 0  # the old critic, still serving
