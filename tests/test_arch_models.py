"""The tiny stand-ins of the architectures users train (no vLLM): what they keep of the real ones,
and tokenizers that transformers loads as the server does, with the same ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from espo_server.tiny_model import ARCHS, build_tokenizer, make_arch_models


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_models_are_tied_chat_models_with_a_regression_critic(arch, tmp_path):
    policy, critic = make_arch_models(tmp_path / "a", arch, seed=0)
    config = AutoConfig.from_pretrained(policy)
    assert config.tie_word_embeddings and config.num_key_value_heads < config.num_attention_heads
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs 64
    with safe_open(str(policy / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: saved once, as the input embeddings
    critic_config = json.loads((critic / "config.json").read_text())
    assert critic_config["architectures"] == [ARCHS[arch].critic_class]
    assert critic_config["problem_type"] == "regression" and len(critic_config["id2label"]) == 1
    again, _ = make_arch_models(tmp_path / "b", arch, seed=0)  # seeded
    with (
        safe_open(str(policy / "model.safetensors"), "pt") as a,
        safe_open(str(again / "model.safetensors"), "pt") as b,
    ):
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    # the tokenizer transformers loads from the model (as the server does) is the one built here
    loaded, built = AutoTokenizer.from_pretrained(policy), build_tokenizer(ARCHS[arch])
    chat = [{"role": "user", "content": "7+5= (ab)"}, {"role": "assistant", "content": "12"}]
    ids = built.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    text = loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert loaded.encode(text, add_special_tokens=False) == ids
    assert loaded.decode(ids) == text and "\n" in text
    assert loaded.eos_token_id == config.eos_token_id and loaded.eos_token_id in ids
