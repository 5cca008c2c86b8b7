"""Critic clients against real critic servers, and a rollout server whose critic is unreachable."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import asdict

import httpx
import numpy as np
import pytest

from espo_client.protocol import EspoState
from espo_server.critic import CriticError
from espo_server.critic_http import EspoValuesCritic, VllmPoolingCritic
from espo_server.process import ServerProcess, free_port, vllm_serve_argv
from tests.live_server import PREFIXES, hf_values

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_pooling_server(quick_toy, server_logs) -> Iterator[ServerProcess]:
    """A stock `vllm serve --runner pooling` (what a user may host instead of our critic server) on
    the trained toy critic (the quick toy's: the suite's ESPO_TOY_SIZE). The session's
    `espo-server critic` serves the tiny critic."""
    port = free_port()
    argv = vllm_serve_argv(
        str(quick_toy.critic_dir), "--runner", "pooling", "--dtype", "float32", "--max-model-len", "512",
        "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "critic",
        # LAST pooling, so that it may reuse cached prefixes (see VllmPoolingCritic)
        "--pooler-config", '{"task": "classify"}', "--block-size", "32",
    )  # fmt: skip
    with ServerProcess("vllm-pooling", argv, port, server_logs, ready_path="/health") as proc:
        yield proc.wait_ready()


async def query(critic, prefixes):
    try:
        await critic.check()
        return await critic.values(prefixes)
    finally:
        await critic.aclose()


def test_espo_critic_server_matches_hf(critic_server, tiny_models):
    got = asyncio.run(query(EspoValuesCritic(critic_server.url), PREFIXES))
    np.testing.assert_allclose(got, hf_values(tiny_models["critic"], PREFIXES), atol=1e-4)
    r = httpx.post(critic_server.url + "/v1/values", json={"token_ids": [[5, 999]]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "token_ids[0]"
    r = httpx.post(critic_server.url + "/v1/values", json={"token_ids": []}, timeout=30)
    assert r.status_code == 400


def test_vllm_pooling_critic_matches_hf(vllm_pooling_server, quick_toy):
    got = asyncio.run(query(VllmPoolingCritic(vllm_pooling_server.url, model="critic"), PREFIXES))
    np.testing.assert_allclose(got, hf_values(quick_toy.critic_dir, PREFIXES), atol=1e-4)


def test_unreachable_critic_raises_critic_error():
    critic = EspoValuesCritic(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    with pytest.raises(CriticError, match="unreachable"):
        asyncio.run(query(critic, [[1, 2]]))


def test_rollouts_with_a_dead_critic_are_flagged_never_silently_changed(orphan_server):
    ready = httpx.get(orphan_server.url + "/readyz", timeout=30)
    assert ready.status_code == 200  # readiness follows what the server can do: it serves, flagged
    assert ready.json()["detail"]["engine"] == "ok" and "down" in ready.json()["detail"]["critic"]
    hot = asdict(EspoState(mu=0.3, var=0.2, beta=10.0, warm=True, initialised=True))
    # wait until the policy engine serves
    body = {"prompts": [{"token_ids": [5, 6, 14]}], "n": 8, "max_tokens": 64, "seed": 2,
            "stop_rule": "espo", "state": hot}  # fmt: skip
    r = httpx.post(orphan_server.url + "/v1/rollouts", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["critic_errors"] > 0
    flagged = [t for t in out["trajectories"] if t["critic_error"]]
    assert flagged, "queries were due (hot state) and every one failed"
    assert all(t["end_reason"] != "espo_stop" for t in out["trajectories"])  # policy no_stop
    metrics = httpx.get(orphan_server.url + "/metrics", timeout=30).text
    assert 'espo_critic_calls_total{outcome="error"}' in metrics


def test_trained_toy_critic_on_vllm_matches_hf(vllm_pooling_server, quick_toy):
    from transformers import AutoConfig

    from espo_server.toy.task import encode

    critic_dir = quick_toy.critic_dir
    config = AutoConfig.from_pretrained(critic_dir)
    assert config.architectures == ["LlamaForTokenClassification"]
    assert config.num_labels == 1 and config.problem_type == "regression" and not config.tie_word_embeddings
    assert config.head_dim == 64
    prefixes = [
        encode("7+5+9+2=" + r) for r in ("", "7+5=12;", "7+5=13;13+9=22", "7+5=12;12+9=21;21+2=23;#23")
    ]
    got = asyncio.run(query(VllmPoolingCritic(vllm_pooling_server.url, model="critic"), prefixes))
    np.testing.assert_allclose(got, hf_values(critic_dir, prefixes), atol=1e-4)
