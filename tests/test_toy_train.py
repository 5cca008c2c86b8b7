"""Training the toy models in the reduced (quick) configuration: learns something, saves HF models
that load back, and caches them."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from espo_server.tiny_model import EOS_ID, make_policy  # noqa: E402
from espo_server.toy.task import decode, encode, generate  # noqa: E402
from espo_server.toy.train import (  # noqa: E402
    ToyConfig,
    critic_values,
    ensure_toy_models,
    log_likelihood,
    rollouts,
    sample,
)

pytestmark = pytest.mark.slow

STEP_FORMAT = re.compile(r"^(-?\d+[+-]\d+=-?\d+;)+#-?\d+$")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return ensure_toy_models(tmp_path_factory.mktemp("cache"), seed=0, quick=True)


def test_trained_policy_beats_random_weights(toy):
    cfg = ToyConfig.quick()
    policy = transformers.LlamaForCausalLM.from_pretrained(toy.policy_dir)
    random_policy = make_policy(cfg.model, seed=0)
    test = generate(128, "test", seed=5, spec=toy.task)
    ll_trained, ll_random = log_likelihood(policy, test), log_likelihood(random_policy, test)
    assert ll_random < -3.0  # about -log(vocabulary size)
    assert ll_trained > ll_random + 2.0, (ll_trained, ll_random)

    # greedy answers are written in the step format, and some are right
    responses = sample(policy, [p.prompt for p in test], cfg.max_new_tokens, temperature=0)
    texts = [decode(r) for r in responses]
    formatted = np.mean([finished and bool(STEP_FORMAT.match(t)) for t, finished in texts])
    assert formatted > 0.5, texts[:5]
    first_right = np.mean([r[:1] == encode(p.solution[0]) for r, p in zip(responses, test, strict=True)])
    assert first_right > 0.3  # copies the first operand (a random policy: ~1/43)
    assert not any(STEP_FORMAT.match(decode(r)[0]) for r in sample(random_policy, ["1+2="] * 8, 20))


def test_critic_loads_and_gives_sane_values(toy):
    critic = transformers.AutoModelForTokenClassification.from_pretrained(toy.critic_dir)
    assert critic.config.num_labels == 1 and critic.config.problem_type == "regression"
    policy = transformers.LlamaForCausalLM.from_pretrained(toy.policy_dir)
    samples = rollouts(policy, generate(32, "test", seed=6, spec=toy.task), 40, seed=1)
    values = critic_values(critic, samples)
    assert [len(v) for v in values] == [len(s.response_ids) + 1 for s in samples]  # V(s_0)..V(s_R)
    flat = np.concatenate(values)
    assert np.isfinite(flat).all()
    assert -0.5 < flat.mean() < 1.5 and flat.std() > 1e-4  # regression onto 0/1, not constant
    with torch.no_grad():
        out = critic(input_ids=torch.tensor([samples[0].prompt_ids + samples[0].response_ids])).logits
    assert out.shape == (1, len(samples[0].prompt_ids) + len(samples[0].response_ids), 1)
    assert samples[0].response_ids[-1] == EOS_ID or len(samples[0].response_ids) == 40


def test_report_and_cache(toy, tmp_path):
    report = json.loads((toy.policy_dir.parent / "report.json").read_text())
    assert report == toy.report
    assert report["policy"]["eval_history"] and report["policy"]["params"] > 0
    assert 0.0 <= report["policy"]["accuracy_t1"] <= 1.0
    assert set(report["critic"]["heldout"]) >= {"auc_at_0.50", "mse", "mse_constant"}
    for d in (toy.policy_dir, toy.critic_dir):
        assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()

    # a second call reuses the entry without training
    mtime = (toy.policy_dir / "model.safetensors").stat().st_mtime_ns
    again = ensure_toy_models(toy.policy_dir.parent.parent, seed=0, quick=True)
    assert again.policy_dir == toy.policy_dir and again.report == toy.report
    assert (toy.policy_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    # a tiny budget: this checks the cache logic, not learning
    cfg = replace(ToyConfig.quick(), max_steps=4, eval_every=100, critic_samples=16, critic_steps=2)
    first = ensure_toy_models(tmp_path, seed=1, config=cfg)
    (first.policy_dir.parent / "report.json").unlink()  # as if a run died before finishing
    (first.policy_dir / "model.safetensors").write_bytes(b"garbage")
    second = ensure_toy_models(tmp_path, seed=1, config=cfg)
    assert (second.policy_dir.parent / "report.json").exists()
    transformers.LlamaForCausalLM.from_pretrained(second.policy_dir)  # loads: rebuilt, not the garbage
    assert [p.name for p in tmp_path.iterdir()] == [first.policy_dir.parent.name]  # no temp dirs left
