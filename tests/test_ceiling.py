"""bench/ceiling.py, reduced: the offline replay of the stop rule with an oracle, noisy and trained
critics at matched stop rates, on the reduced toy models (no vLLM)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from espo_client.stop_rule import EspoParams, EspoState


@pytest.fixture(scope="module")
def ceiling():
    from bench import ceiling

    return ceiling


def logged(ceiling, g: list[float], correct: bool, first_wrong: int | None):
    return ceiling.Logged(
        prompt=[5, 6, 7], tokens=[9] * len(g), g=g, correct=correct, first_wrong=first_wrong, problem=0
    )


def test_replay_counts_stops_false_stops_and_engine_tokens(ceiling):
    """Two trajectories by hand: a failing one whose regret spikes after its mistake, and a correct
    one; regret_only at a threshold that stops only the first."""
    params = EspoParams(min_tokens=0, critic_stride=1, alpha_s=0.5, eps=0.2)
    state = EspoState(mu=0.0, var=1.0, beta=2.0, warm=True, initialised=True)
    logs = [logged(ceiling, [0.0, 0.0, 4.0, 4.0, 0.0, 0.0], False, 2), logged(ceiling, [0.0] * 6, True, None)]
    oracle = [np.full(7, 0.05), np.full(7, 0.9)]
    out = ceiling.replay(logs, "regret_only", state, params, None, oracle, latency=0)
    # z = 0, 0, 2, ...: 2 > beta*eps = 0.2 at t=2: kept 3 tokens, 3 + 6 generated of 12
    assert (out["stops"], out["false_stops"], out["failing_caught"]) == (1, 0, 1.0)
    assert out["engine_tokens"] == 9 and out["engine_saved"] == pytest.approx(3 / 12)
    assert out["oracle_share"] == pytest.approx(3 / 3)  # the oracle cuts after token 2: saves 3
    assert out["lost_successes"] == pytest.approx(0.05)
    # espo with a critic that answers 2 tokens late: the stop is still at 2, 2 tokens discarded
    late = ceiling.replay(logs, "espo", state, params, oracle, oracle, latency=2)
    assert (late["stops"], late["discarded_tokens"], late["engine_tokens"]) == (1, 2, 11)
    assert late["critic_calls"] == 1 and late["critic_tokens"] == 3 + 2


def test_noise_reaches_the_auc_asked(ceiling):
    rng = np.random.default_rng(0)
    logs, values = [], []
    for i in range(200):
        f = int(rng.integers(2, 20)) if i % 2 else None
        length = 30
        logs.append(logged(ceiling, [0.0] * length, f is None, f))
        v = np.full(length + 1, 0.8 if f is None else 0.6)
        if f is not None:
            v[f + 1 :] = 0.02
        values.append(v)
    assert ceiling.auc_after_mistake(values, logs) == pytest.approx(1.0)
    for target in (0.7, 0.9):
        sigma, noisy = ceiling.noise_for_auc(values, logs, target, rho=0.9, seed=1)
        assert sigma > 0 and ceiling.auc_after_mistake(noisy, logs) == pytest.approx(target, abs=0.01)


@pytest.mark.slow
def test_reduced_ceiling_on_the_quick_models(ceiling, tmp_path):
    out = tmp_path / "ceiling.json"
    argv = [
        "--quick-models", "--seeds", "0", "--problems", "24", "--n", "2", "--max-tokens", "40",
        "--rates", "0.25", "--aucs", "0.8", "--recovery-prefixes", "20", "--check-prefixes", "10",
        "--continuations", "8", "--latencies", "0,2", "--out", str(out),
    ]  # fmt: skip
    summary = ceiling.main(argv)
    seed = summary["seeds"][0]
    rows = seed["rows"]
    matched = [r for r in rows if r["rate"] == 0.25]
    assert {(r["rule"], r["critic"]) for r in matched} >= {
        ("regret_only", None), ("espo", "oracle"), ("espo", "toy critic"), ("espo", "noisy AUC 0.8"),
    }  # fmt: skip
    full = seed["logged"] * seed["mean_length"]
    for r in rows:
        assert 0 <= r["stops"] <= seed["logged"] and r["false_stops"] <= r["stops"]
        assert 0 < r["engine_tokens"] <= full + 1e-6 and r["discarded_tokens"] >= 0
        if r["rule"] == "regret_only":
            assert r["critic_calls"] == 0 and r["discarded_tokens"] == 0
    assert math.isfinite(seed["oracle_check"]["recovery_rate"])
    assert set(seed["quality"]) == {"oracle", "toy critic", "noisy AUC 0.8"}  # each critic measured
    assert json.loads(out.read_text())["seeds"][0]["seed"] == 0
    assert "| regret_only |" in out.with_suffix(".md").read_text()
