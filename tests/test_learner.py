"""Learner helpers: tensors from trajectories, GAE with absorbing stops and EGAE, Entropy-ESPO, and the
learner-owned ESPO state update. Pure CPU maths, no server."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from espo_client.entropy_espo import (  # noqa: E402
    HIGH,
    PAD,
    REST,
    adaptive_clip_range,
    entropy_espo_loss,
    entropy_from_logits,
    entropy_groups,
    group_ratio,
    topk_entropy,
)
from espo_client.learner import (  # noqa: E402
    END_REASON_CODES,
    batch_stats,
    compute_gae,
    compute_gae_reference,
    trajectories_to_tensors,
    update_learner_state,
)
from espo_client.protocol import (  # noqa: E402
    Carried,
    EspoState,
    RolloutResponse,
    Traces,
    Trajectory,
    Usage,
    VersionSpan,
)
from espo_client.stop_rule import BatchStats, EspoParams, update_state  # noqa: E402

# ---------------------------------------------------------------------------------------------
# GAE: hand-computed numbers for each end reason (gamma = 1, lam = 0.5)
# ---------------------------------------------------------------------------------------------


def gae(rewards, values, lengths, terminal, bootstrap=None, gamma=1.0, lam=0.5):
    rewards, values = torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    mask = (torch.arange(values.shape[1])[None, :] < torch.tensor(lengths)[:, None]).double()
    boot = None if bootstrap is None else torch.tensor(bootstrap, dtype=torch.float64)
    args = (rewards, values, mask, torch.tensor(terminal), boot, gamma, lam)
    fast, reference = compute_gae(*args), compute_gae_reference(*args)
    torch.testing.assert_close(fast[0], reference[0])
    torch.testing.assert_close(fast[1], reference[1])
    return fast


def test_gae_eos_is_terminal() -> None:
    # V = (.5, .6, .7), reward 1 on the last token, next value 0:
    # delta = (.6-.5, .7-.6, 1-.7) = (.1, .1, .3); A2 = .3, A1 = .1+.5*.3 = .25, A0 = .1+.5*.25 = .225
    adv, ret = gae([[0, 0, 1.0]], [[0.5, 0.6, 0.7]], [3], [True])
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]], dtype=torch.float64))


def test_gae_espo_stop_is_an_absorbing_failure() -> None:
    # stopped at step 1 (2 kept tokens), r_fail = -1 on the stop token, padding value 9.9 ignored:
    # delta1 = -1 + 0 - .3 = -1.3, delta0 = .3 - .4 = -.1; A1 = -1.3, A0 = -.1 + .5*(-1.3) = -.75
    adv, ret = gae([[0, -1.0, 0]], [[0.4, 0.3, 9.9]], [2], [True])
    torch.testing.assert_close(adv, torch.tensor([[-0.75, -1.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[-0.35, -1.0, 0.0]], dtype=torch.float64))
    # gamma = lam = 1: every token's advantage is r_fail - V(s_t)
    adv, _ = gae([[0, 0, -1.0]], [[0.4, 0.3, 0.2]], [3], [True], gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.4, -1.3, -1.2]], dtype=torch.float64))


def test_gae_length_is_truncated_and_bootstrapped() -> None:
    # no reward; default bootstrap V(s_L) ~ V(s_{L-1}) = .8 (T-PPO):
    # delta = (.4-.2, .8-.4, .8-.8) = (.2, .4, 0); A2 = 0, A1 = .4, A0 = .2 + .5*.4 = .4
    adv, ret = gae([[0, 0, 0.0]], [[0.2, 0.4, 0.8]], [3], [False])
    torch.testing.assert_close(adv, torch.tensor([[0.4, 0.4, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.6, 0.8, 0.8]], dtype=torch.float64))
    # an explicit bootstrap V(s_L) = 1: delta2 = .2; A1 = .4 + .1 = .5, A0 = .2 + .25 = .45
    adv, _ = gae([[0, 0, 0.0]], [[0.2, 0.4, 0.8]], [3], [False], bootstrap=[1.0])
    torch.testing.assert_close(adv, torch.tensor([[0.45, 0.5, 0.2]], dtype=torch.float64))
    # the same numbers as eos would give with the reward replaced by the bootstrap value
    terminal_adv, _ = gae([[0, 0, 1.0]], [[0.2, 0.4, 0.8]], [3], [True])
    torch.testing.assert_close(adv, terminal_adv)


def test_gae_mixed_batch_with_discount() -> None:
    # the three rows together, padded to 4, gamma .9: rows are independent of each other
    rows = [
        ([0, 0, 1.0, 0], [0.5, 0.6, 0.7, 3.0], 3, True),
        ([0, -1.0, 0, 0], [0.4, 0.3, 2.0, 2.0], 2, True),
        ([0, 0, 0, 0.0], [0.2, 0.4, 0.8, 0.1], 3, False),
        ([0, 0, 0, 0.0], [1.0, 1.0, 1.0, 1.0], 0, False),
    ]
    adv, _ = gae(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        gamma=0.9,
        lam=0.5,
    )
    # row 0 by hand: delta = (.54-.5, .63-.6, 1-.7) = (.04, .03, .3); A2 = .3, A1 = .03 + .45*.3, ...
    a2 = 0.3
    a1 = 0.03 + 0.45 * a2
    a0 = 0.04 + 0.45 * a1
    torch.testing.assert_close(adv[0], torch.tensor([a0, a1, a2, 0.0], dtype=torch.float64))
    assert adv[3].abs().sum() == 0  # an empty (aborted) row contributes nothing


def test_gae_vectorised_matches_reference_loop_on_random_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        batch, horizon = 7, 9
        lengths = torch.randint(0, horizon + 1, (batch,), generator=generator)
        mask = (torch.arange(horizon)[None, :] < lengths[:, None]).float()
        values = torch.randn(batch, horizon, generator=generator)
        values = torch.where(mask > 0, values, torch.full_like(values, math.nan))  # padding is never read
        rewards = torch.randn(batch, horizon, generator=generator) * mask
        terminal = torch.rand(batch, generator=generator) < 0.5
        bootstrap = torch.randn(batch, generator=generator) if trial % 2 else None
        gamma, lam = (
            float(torch.rand(1, generator=generator)) * 0.5 + 0.5,
            float(torch.rand(1, generator=generator)),
        )
        fast = compute_gae(rewards, values, mask, terminal, bootstrap, gamma, lam)
        slow = compute_gae_reference(rewards, values, mask, terminal, bootstrap, gamma, lam)
        for got, want in zip(fast, slow, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            assert (got * (1 - mask)).abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Trajectories -> tensors
# ---------------------------------------------------------------------------------------------


def traj(prompt_index, sample_index, tokens, end_reason, reward=None, entropy=None) -> Trajectory:
    return Trajectory(
        prompt_index=prompt_index,
        sample_index=sample_index,
        token_ids=tokens,
        logprobs=[-0.1 * (k + 1) for k in range(len(tokens))],
        end_reason=end_reason,
        stop_step=len(tokens) - 1 if end_reason == "espo_stop" else None,
        reward=reward,
        policy_version=0,
        traces=Traces(entropy=entropy) if entropy is not None else None,
    )


def test_trajectories_to_tensors_layout_and_rewards() -> None:
    prompts = [[101, 102, 103], [201]]
    trajectories = [
        traj(0, 0, [5, 6, 7], "eos"),  # scored by the learner
        traj(1, 0, [8, 9], "espo_stop", reward=-1.0),
        traj(1, 1, [4, 4, 4, 4], "length"),
        traj(0, 1, [3], "abort"),
    ]
    out = trajectories_to_tensors(trajectories, prompts, pad_id=0, rewards=[1.0, None, None, None])
    assert out["input_ids"].tolist() == [
        [101, 102, 103, 5, 6, 7, 0],
        [0, 0, 201, 8, 9, 0, 0],
        [0, 0, 201, 4, 4, 4, 4],
        [101, 102, 103, 3, 0, 0, 0],
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
    ]
    assert out["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert out["responses"].tolist()[1] == [8, 9, 0, 0]
    assert out["response_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert out["token_level_rewards"].tolist() == [[0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(out["old_logprobs"][2], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert out["old_logprobs"][1, 2:].abs().sum() == 0
    assert out["terminal"].tolist() == [True, True, False, False]
    assert out["end_reason"].tolist() == [
        END_REASON_CODES[r] for r in ("eos", "espo_stop", "length", "abort")
    ]
    assert out["response_lengths"].tolist() == [3, 2, 4, 1] and out["prompt_lengths"].tolist() == [3, 1, 1, 3]
    assert "old_entropy" not in out

    with pytest.raises(ValueError, match="no reward"):
        trajectories_to_tensors(trajectories, prompts)  # the eos trajectory has nobody's reward
    with pytest.raises(ValueError, match="prompt_index"):
        trajectories_to_tensors(trajectories, prompts[:1], rewards=[1.0, None, None, None])


def test_carried_trajectories_bring_their_prompt_and_version_spans() -> None:
    carried = Carried(
        request_id="earlier", prompt_token_ids=[301, 302], stop_rule="none", shadow=False,
        max_tokens=8, temperature=1.0, top_p=1.0,
    )  # fmt: skip
    spans = [VersionSpan(start=0, end=2, version=3), VersionSpan(start=2, end=4, version=4)]
    trajectories = [
        traj(0, 0, [5, 6], "length"),
        traj(7, 1, [8, 9, 10, 11], "length").model_copy(
            update={"carried": carried, "policy_version": 3, "policy_version_spans": spans}
        ),
    ]
    out = trajectories_to_tensors(trajectories, [[101]])  # prompt 7 is not this call's: carried brings it
    assert out["input_ids"].tolist() == [[0, 101, 5, 6, 0, 0], [301, 302, 8, 9, 10, 11]]
    assert out["policy_versions"].tolist() == [[0, 0, -1, -1], [3, 3, 4, 4]]
    fresh = out["response_mask"] * (out["policy_versions"] >= 4)  # drop the span of version 3
    assert fresh.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]


def test_tensors_feed_gae_and_carry_entropy_traces() -> None:
    trajectories = [traj(0, 0, [5, 6], "espo_stop", -1.0, [0.5, 0.7]), traj(0, 1, [7], "eos", 0.0, [0.1])]
    out = trajectories_to_tensors(trajectories, [[1, 2]])
    torch.testing.assert_close(out["old_entropy"], torch.tensor([[0.5, 0.7], [0.1, 0.0]]))
    values = torch.tensor([[0.2, 0.1], [0.3, 5.0]])
    adv, _ = compute_gae(out["token_level_rewards"], values, out["response_mask"], out["terminal"], lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.2, -1.1], [-0.3, 0.0]]))


# ---------------------------------------------------------------------------------------------
# Entropy-ESPO
# ---------------------------------------------------------------------------------------------


def test_topk_entropy_is_exact_when_k_is_the_vocabulary() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 11))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    exact = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(topk_entropy(logp, 11), exact, rtol=1e-12)
    # shuffled top-k order and -inf entries (zero-probability tokens) are fine
    assert topk_entropy([math.log(0.5), -math.inf, math.log(0.5)], 3) == pytest.approx(math.log(2))


def test_topk_entropy_spreads_the_rest_uniformly() -> None:
    # p = (.5, .2) and .3 over 3 other tokens (V = 5): exact when the tail is uniform
    probs = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    exact = float(-(probs * np.log(probs)).sum())
    assert topk_entropy(np.log(probs[:2]), 5) == pytest.approx(exact, rel=1e-12)
    # a skewed tail: the estimate is an upper bound, the truncated sum a lower one
    probs = np.array([0.5, 0.2, 0.25, 0.04, 0.01])
    exact = float(-(probs * np.log(probs)).sum())
    head = float(-(probs[:2] * np.log(probs[:2])).sum())
    assert head < exact < topk_entropy(np.log(probs[:2]), 5)
    with pytest.raises(ValueError):
        topk_entropy(np.log(probs), 3)


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        entropy_from_logits(logits), torch.tensor([math.log(4), 0.0]), atol=1e-6, rtol=0
    )


def test_entropy_groups_take_the_top_fraction_per_sequence() -> None:
    entropy = torch.tensor([[0.1, 2.0, 0.2, 0.3, 0.4], [0.9, 0.8, 0.9, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    groups = entropy_groups(entropy, mask, top_fraction=0.2)
    H, R, P = HIGH, REST, PAD
    # 0.2*5 = 1 token; 0.2*4 -> ceil 1 (a tie at .9: the earlier token; 5.0 is padding); 0.2*3 -> 1
    assert groups.tolist() == [[R, H, R, R, R], [H, R, R, R, P], [H, R, R, P, P]]
    groups = entropy_groups(entropy, mask, top_fraction=0.5)  # non-contiguous groups
    assert groups[0].tolist() == [R, H, R, H, H]


def hand_example(advantage: float):
    # one sequence of 5 tokens; high-entropy group = token 1 (q = .2), the rest = 0, 2, 3, 4
    entropy = torch.tensor([[0.1, 2.0, 0.2, 0.3, 0.4]], dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.float64)
    logp_old = torch.tensor([[-1.0, -2.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    logp_new = (logp_old + torch.tensor([[0.1, 0.5, -0.1, 0.2, 0.0]], dtype=torch.float64)).requires_grad_()
    advantages = torch.full((1, 5), advantage, dtype=torch.float64)
    return entropy, mask, logp_old, logp_new, advantages


def test_group_ratio_and_adaptive_clip_on_a_hand_example() -> None:
    entropy, mask, logp_old, logp_new, _ = hand_example(1.0)
    groups = entropy_groups(entropy, mask, 0.2)
    ratio = group_ratio(logp_new, logp_old, groups)
    s_high, s_rest = math.exp(0.5), math.exp((0.1 - 0.1 + 0.2 + 0.0) / 4)
    torch.testing.assert_close(
        ratio.detach(), torch.tensor([[s_rest, s_high, s_rest, s_rest, s_rest]], dtype=torch.float64)
    )
    # the token's gradient only: d ratio_t / d logp_new_t = s_tau, nothing across tokens
    ratio[0, 2].backward()
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0, 0, s_rest, 0, 0]], dtype=torch.float64))
    eps = adaptive_clip_range(entropy, groups, vocab_size=100, alpha=0.02)
    eps_high, eps_rest = 0.02 * 2.0 / math.log(100), 0.02 * 0.25 / math.log(100)
    torch.testing.assert_close(
        eps, torch.tensor([[eps_rest, eps_high, eps_rest, eps_rest, eps_rest]], dtype=torch.float64)
    )


def test_entropy_espo_objective_on_a_hand_example() -> None:
    entropy, mask, logp_old, logp_new, advantages = hand_example(1.0)
    s_high, s_rest = math.exp(0.5), math.exp(0.05)
    # alpha 1: eps_high = 2/ln 100 = .434 (s_high = 1.649 is clipped to 1.434), eps_rest = .25/ln 100 = .0543
    # (s_rest = 1.0513 < 1.0543 is not clipped); J = mean over the 2 groups of their token means
    loss, stats = entropy_espo_loss(logp_new, logp_old, advantages, entropy, mask, vocab_size=100, alpha=1.0)
    eps_high = 2.0 / math.log(100)
    assert float(loss.detach()) == pytest.approx(-((1 + eps_high) + s_rest) / 2)
    assert stats["clip_fraction"] == pytest.approx(1 / 5)
    loss.backward()
    # clipped group: no gradient; the other: -s_rest * A / (4 tokens * 2 groups) per token
    g = -s_rest / 8
    torch.testing.assert_close(logp_new.grad, torch.tensor([[g, 0.0, g, g, g]], dtype=torch.float64))

    # a negative advantage takes the pessimistic, unclipped branch for the high group
    entropy, mask, logp_old, logp_new, advantages = hand_example(-1.0)
    loss, stats = entropy_espo_loss(logp_new, logp_old, advantages, entropy, mask, vocab_size=100, alpha=1.0)
    assert float(loss.detach()) == pytest.approx((s_high + s_rest) / 2)
    assert stats["clip_fraction"] == 0.0


def test_entropy_espo_loss_batch_with_padding_and_sequence_advantages() -> None:
    generator = torch.Generator().manual_seed(1)
    logp_old = -torch.rand(3, 6, generator=generator)
    logp_new = logp_old.clone().requires_grad_()
    entropy = torch.rand(3, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    # on-policy (ratio 1): J = mean over sequences with tokens of their advantage
    loss, stats = entropy_espo_loss(logp_new, logp_old, torch.tensor([1.0, -2.0, 7.0]), entropy, mask, 50)
    assert float(loss.detach()) == pytest.approx(-(1.0 - 2.0) / 2)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0
    loss.backward()
    assert logp_new.grad[2].abs().sum() == 0 and logp_new.grad[1, 3:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Learner-owned ESPO state
# ---------------------------------------------------------------------------------------------


def response_from(g_per_trajectory, stopped, shadow=False, state=None) -> RolloutResponse:
    stats = BatchStats()
    for g, s in zip(g_per_trajectory, stopped, strict=True):
        stats.add_trajectory(g, s)
    n_stop = sum(stopped)
    usage = Usage(
        prompt_tokens=1,
        generated_tokens=stats.tokens,
        trajectories=stats.trajectories,
        stopped=0 if shadow else n_stop,
        shadow_stopped=n_stop if shadow else 0,
        regret_tokens=stats.tokens,
        regret_sum=stats.g_sum,
        regret_sumsq=stats.g_sumsq,
    )
    state = state or EspoState()
    return RolloutResponse(
        request_id="r",
        trajectories=[],
        usage=usage,
        stop_rule="espo",
        shadow=shadow,
        rule_params={"a_ema": 0.9, "eta_beta": 0.5, "tau": 0.25, "warm_after_batches": None},
        state_used=state,
        state_after=None,
        policy_version=0,
    )


@pytest.mark.parametrize("shadow", [False, True])
def test_learner_owned_state_update_equals_the_server_math(shadow: bool) -> None:
    rng = np.random.default_rng(2)
    params = EspoParams(a_ema=0.9, eta_beta=0.5, tau=0.25)
    state = EspoState(mu=0.3, var=0.2, beta=5.0, warm=True, initialised=True, batches=2)
    calls = [
        ([rng.exponential(size=rng.integers(1, 9)) for _ in range(4)], [True, False, False, True]),
        ([rng.exponential(size=rng.integers(1, 9)) for _ in range(3)], [False, False, True]),
    ]
    # what the server computes, trajectory by trajectory, for one batch made of both calls
    server = BatchStats()
    for gs, stopped in calls:
        for g, s in zip(gs, stopped, strict=True):
            server.add_trajectory(g, s)
    expected = update_state(state, server, params)

    responses = [response_from(gs, stopped, shadow) for gs, stopped in calls]
    assert batch_stats(responses).stops == 3 and batch_stats(responses).tokens == server.tokens
    got = update_learner_state(state, responses)  # params taken from the responses' rule_params
    assert asdict(got) == pytest.approx(asdict(expected), rel=1e-12)
    assert got.beta == pytest.approx(5.0 + 0.5 * (3 / 7 - 0.25))
    assert update_learner_state(state, responses[0], params) == update_state(
        state, responses[0].batch_stats(), params
    )

    assert update_learner_state(state, []) == state
