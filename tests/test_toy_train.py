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
    CRITIC_TARGETS,
    ToyConfig,
    auc,
    critic_quality,
    critic_values,
    ensure_toy_models,
    log_likelihood,
    lr_factor,
    rollouts,
    sample,
    weights_sha256,
)

pytestmark = pytest.mark.slow

STEP_FORMAT = re.compile(r"^(-?\d+[+-]\d+=-?\d+;)+#-?\d+$")


@pytest.fixture(scope="module")
def toy(quick_toy):
    """The session's quick toy models: trained once for the whole suite (the embedded-toy tests use
    them too); training itself is checked below on smaller budgets."""
    return quick_toy


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
    assert set(report["critic"]["heldout"]) >= {
        "auc_at_0.50", "mse", "mse_constant", "mse_ratio", "auc_after_mistake", "drop_after_mistake"
    }  # fmt: skip
    assert set(report["critic"]["heldout"]["targets_met"]) == set(CRITIC_TARGETS)
    assert report["torch_threads"] == 1
    for d in (toy.policy_dir, toy.critic_dir):
        assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()

    # a second call reuses the entry without training
    mtime = (toy.policy_dir / "model.safetensors").stat().st_mtime_ns
    again = ensure_toy_models(toy.policy_dir.parent.parent, seed=0, quick=True)
    assert again.policy_dir == toy.policy_dir and again.report == toy.report
    assert (toy.policy_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    # a tiny budget: this checks the cache logic, not learning
    cfg = replace(ToyConfig.quick(), policy_steps=4, eval_every=100, critic_problems=8, critic_steps=2)
    first = ensure_toy_models(tmp_path, seed=1, config=cfg)
    (first.policy_dir.parent / "report.json").unlink()  # as if a run died before finishing
    (first.policy_dir / "model.safetensors").write_bytes(b"garbage")
    second = ensure_toy_models(tmp_path, seed=1, config=cfg)
    assert (second.policy_dir.parent / "report.json").exists()
    transformers.LlamaForCausalLM.from_pretrained(second.policy_dir)  # loads: rebuilt, not the garbage
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # the trainers' lock stays
    assert left == [first.policy_dir.parent.name]  # no temp dirs left


TINY = replace(
    ToyConfig.quick(),
    policy_steps=6,
    eval_every=3,
    critic_problems=8,
    critic_heldout_problems=8,
    critic_steps=3,
)


def test_same_seed_gives_bit_identical_models(tmp_path):
    """Training is deterministic for a seed: two runs, same weights (hash) and the same figures."""
    first = ensure_toy_models(tmp_path / "a", seed=3, config=TINY)
    second = ensure_toy_models(tmp_path / "b", seed=3, config=TINY)
    other = ensure_toy_models(tmp_path / "c", seed=4, config=TINY)

    def figures(report: dict) -> dict:
        drop = {"train_time_s", "total_time_s"}
        return {
            k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, dict) else v)
            for k, v in report.items()
            if k not in drop
        }

    assert figures(first.report) == figures(second.report)
    for part in ("policy", "critic"):
        assert first.report[part]["weights_sha256"] == second.report[part]["weights_sha256"]
        assert first.report[part]["weights_sha256"] != other.report[part]["weights_sha256"]
    a = (first.policy_dir / "model.safetensors").read_bytes()
    assert a == (second.policy_dir / "model.safetensors").read_bytes()
    loaded = transformers.LlamaForCausalLM.from_pretrained(first.policy_dir)
    assert weights_sha256(loaded) == first.report["policy"]["weights_sha256"]
    # the evaluations during training only print: the step count is the configured one
    assert first.report["policy"]["steps"] == TINY.policy_steps
    assert [h["step"] for h in first.report["policy"]["eval_history"]] == [3]
    # the torch settings are restored afterwards
    assert not torch.are_deterministic_algorithms_enabled()


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_auc_from_ranks_matches_pairwise_counts():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert np.isnan(auc([1.0, 2.0], [True, True]))


def test_critic_quality_measures_what_it_says(monkeypatch):
    from espo_server.toy import train

    # 2 failing samples (first wrong token at 2) and 2 successful, responses of 12 tokens
    samples = [
        train.Sample([5], [6] * 12, 0.0, 2),
        train.Sample([5], [6] * 12, 0.0, 2),
        train.Sample([5], [6] * 12, 1.0, None),
        train.Sample([5], [6] * 12, 1.0, None),
    ]
    seeing = [np.r_[[0.5] * 3, [0.1] * 10], np.r_[[0.5] * 3, [0.1] * 10], np.full(13, 0.9), np.full(13, 0.9)]
    monkeypatch.setattr(train, "critic_values", lambda critic, s: seeing)
    q = critic_quality(None, samples)
    assert q["auc_after_mistake"] == 1.0 and q["drop_after_mistake"] == pytest.approx(0.4)
    assert q["mse_ratio"] < 0.7 and all(q["targets_met"].values())
    blind = [np.full(13, 0.5)] * 4  # a constant: predicts nothing, sees nothing
    monkeypatch.setattr(train, "critic_values", lambda critic, s: blind)
    q = critic_quality(None, samples)
    assert q["auc_after_mistake"] == 0.5 and q["drop_after_mistake"] == 0.0
    assert q["mse_ratio"] == pytest.approx(1.0) and not any(q["targets_met"].values())
