"""Learner-side helpers for PPO on ESPO rollouts (needs the `torch` extra).

1. `trajectories_to_tensors`: a rollout response -> padded tensors in the layout PPO code expects.
2. `compute_gae`: GAE where `espo_stop` is an absorbing failure state, `eos` is terminal, and a
   `length` cut is bootstrapped (T-PPO's extended GAE); `compute_gae_reference` is the plain loop
   it is tested against.
3. `batch_stats` / `update_learner_state`: the ESPO state update for a learner that owns the state,
   a thin wrapper around the one pure implementation, `stop_rule.update_state`.

What the end reasons mean for the learner:

    end_reason  terminal?             reward on the last kept token        next value after it
    eos         yes                   the task reward (server or learner)   0
    espo_stop   yes, absorbing fail   r_fail (the stop token is kept)       0
    length      no, truncated         none (0), unless the learner adds one V(s_L) or ~V(s_{L-1})
    abort       -                     masked out entirely                   -
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from . import protocol
from .protocol import RolloutRequest, RolloutResponse, Trajectory
from .stop_rule import BatchStats, EspoParams, update_state

__all__ = [
    "END_REASONS",
    "END_REASON_CODES",
    "batch_stats",
    "compute_gae",
    "compute_gae_reference",
    "trajectories_to_tensors",
    "update_learner_state",
    "update_state",
]

END_REASONS: tuple[str, ...] = ("eos", "length", "espo_stop", "abort")
"""End reasons in code order: `end_reason` tensors hold `END_REASON_CODES[name]`."""
END_REASON_CODES: dict[str, int] = {name: code for code, name in enumerate(END_REASONS)}
_TERMINAL = ("eos", "espo_stop")


# ---------------------------------------------------------------------------------------------
# Trajectories -> tensors
# ---------------------------------------------------------------------------------------------


def trajectories_to_tensors(
    trajectories: Sequence[Trajectory],
    prompt_token_ids: Sequence[Sequence[int]] | RolloutRequest,
    pad_id: int = 0,
    *,
    rewards: Sequence[float | None] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch of trajectories into PPO tensors, one row per trajectory (in the given order).

    Layout (verl's): each row is `[left-padded prompt | right-padded response]`, so every response
    starts at column P = the longest prompt, and the response-side tensors are [B, R] with R the
    longest response:

        input_ids       [B, P+R] long   pad_id on padding
        attention_mask  [B, P+R] long   1 on real tokens (prompt and response)
        position_ids    [B, P+R] long   0, 1, ... from the first real token (0 on left padding)
        responses       [B, R]   long   response token ids, pad_id after the end
        response_mask   [B, R]   float  1 on the tokens to train on (0 on padding and on `abort` rows)
        old_logprobs    [B, R]   float  the server's raw log-probability of each sampled token
        token_level_rewards [B, R] float the reward on the last kept token, 0 elsewhere
        response_lengths [B]     long   kept tokens (for `espo_stop`: stop_step + 1)
        prompt_lengths  [B]      long
        end_reason      [B]      long   END_REASON_CODES
        terminal        [B]      bool   eos or espo_stop (no bootstrap in `compute_gae`)
        old_entropy     [B, R]   float  only if every trajectory carries an `entropy` trace
        policy_versions [B, R]   long   the policy version that sampled each token (-1 on padding):
                                        `response_mask * (policy_versions >= v)` drops stale spans
                                        of carried-over trajectories

    The values of a critic run on `input_ids` line up with the response as `values[:, P-1 : P+R-1]`
    (V(s_t) is read at the token before response token t), and the value after the last token,
    V(s_L), at column P+L-1: a learner can pass it to `compute_gae` as `bootstrap_values`.

    Rewards: `rewards[i]`, when given and not None, overrides trajectory i's own `reward` (use it for
    `eos` trajectories the server could not score; overriding `espo_stop`'s r_fail is an ablation).
    An `eos` or `espo_stop` trajectory without any reward is an error; `length` gets 0 unless one
    is given; `abort` rows are masked out (no reward, zero response_mask) so rows stay aligned.

    Args:
        trajectories: e.g. `response.trajectories`.
        prompt_token_ids: the call's prompts by prompt_index (or the RolloutRequest, if its prompts
            were token ids; text prompts were tokenised by the server, which does not return them).
        pad_id: padding token id.
        rewards: optional per-trajectory rewards, aligned with `trajectories`.
        device: where to put the tensors.
    """
    if isinstance(prompt_token_ids, RolloutRequest):
        if any(prompt.token_ids is None for prompt in prompt_token_ids.prompts):
            raise ValueError("text prompts: pass their token ids (the server tokenised them)")
        prompt_token_ids = [prompt.token_ids or [] for prompt in prompt_token_ids.prompts]
    if rewards is not None and len(rewards) != len(trajectories):
        raise ValueError(f"{len(rewards)} rewards for {len(trajectories)} trajectories")
    batch = len(trajectories)
    prompts = []
    for trajectory in trajectories:
        if trajectory.carried is not None:  # started by an earlier call: it brings its prompt
            prompts.append(list(trajectory.carried.prompt_token_ids))
            continue
        if not 0 <= trajectory.prompt_index < len(prompt_token_ids):
            raise ValueError(
                f"prompt_index {trajectory.prompt_index} but {len(prompt_token_ids)} prompts given"
            )
        prompts.append(list(prompt_token_ids[trajectory.prompt_index]))
    p_len = max((len(prompt) for prompt in prompts), default=0)
    r_len = max((len(trajectory.token_ids) for trajectory in trajectories), default=0)

    input_ids = torch.full((batch, p_len + r_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, p_len + r_len), dtype=torch.long)
    response_mask = torch.zeros((batch, r_len), dtype=torch.float32)
    old_logprobs = torch.zeros((batch, r_len), dtype=torch.float32)
    token_level_rewards = torch.zeros((batch, r_len), dtype=torch.float32)
    response_lengths = torch.zeros(batch, dtype=torch.long)
    end_reason = torch.zeros(batch, dtype=torch.long)
    terminal = torch.zeros(batch, dtype=torch.bool)
    with_entropy = batch > 0 and all(
        t.traces is not None and t.traces.entropy is not None and len(t.traces.entropy) == len(t.token_ids)
        for t in trajectories
    )
    old_entropy = torch.zeros((batch, r_len), dtype=torch.float32)
    policy_versions = torch.full((batch, r_len), -1, dtype=torch.long)

    for i, (trajectory, prompt) in enumerate(zip(trajectories, prompts, strict=True)):
        length = len(trajectory.token_ids)
        if len(trajectory.logprobs) != length:
            raise ValueError(f"trajectory {i}: {length} tokens but {len(trajectory.logprobs)} logprobs")
        input_ids[i, p_len - len(prompt) : p_len] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, p_len - len(prompt) : p_len + length] = 1
        input_ids[i, p_len : p_len + length] = torch.tensor(trajectory.token_ids, dtype=torch.long)
        old_logprobs[i, :length] = torch.tensor(trajectory.logprobs, dtype=torch.float32)
        if with_entropy and trajectory.traces is not None and trajectory.traces.entropy is not None:
            old_entropy[i, :length] = torch.tensor(trajectory.traces.entropy, dtype=torch.float32)
        response_lengths[i] = length
        policy_versions[i, :length] = trajectory.policy_version
        for span in trajectory.policy_version_spans:
            policy_versions[i, span.start : min(span.end, length)] = span.version
        end_reason[i] = END_REASON_CODES[trajectory.end_reason]
        if trajectory.end_reason == "abort":
            continue
        terminal[i] = trajectory.end_reason in _TERMINAL
        response_mask[i, :length] = 1.0
        reward = rewards[i] if rewards is not None and rewards[i] is not None else trajectory.reward
        if reward is None and trajectory.end_reason in _TERMINAL:
            raise ValueError(
                f"trajectory {i} ({trajectory.end_reason}, prompt {trajectory.prompt_index}, sample "
                f"{trajectory.sample_index}) has no reward: pass rewards=[...] for it"
            )
        if reward is not None:
            if length == 0:
                raise ValueError(f"trajectory {i} has a reward but no tokens to put it on")
            token_level_rewards[i, length - 1] = float(reward)

    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": input_ids[:, p_len:].clone(),
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "token_level_rewards": token_level_rewards,
        "response_lengths": response_lengths,
        "prompt_lengths": torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long),
        "end_reason": end_reason,
        "terminal": terminal,
        "policy_versions": policy_versions,
    }
    if with_entropy:
        tensors["old_entropy"] = old_entropy
    return {name: tensor.to(device) for name, tensor in tensors.items()} if device is not None else tensors


# ---------------------------------------------------------------------------------------------
# GAE with absorbing failure states and truncation bootstrap
# ---------------------------------------------------------------------------------------------


def compute_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    terminal: torch.Tensor,
    bootstrap_values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, [B, T] each (0 on padding), for right-padded responses.

    For one response with L kept tokens and values[t] = V(s_t), s_t = prompt + response[:t]:

        delta_t = r_t + gamma * V_next(t) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1},     A_L = 0
        R_t     = A_t + V(s_t)                         (the critic's target)

    V_next(t) = V(s_{t+1}) for t < L-1; at the last token, t = L-1:

        terminal (eos, espo_stop)  V_next = 0. `espo_stop` is an absorbing failure state: r_fail
                                   sits on the kept stop token, so its negative TD error
                                   r_fail - V(s_{L-1}) is largest at the stop and decays backwards
                                   by (gamma*lam)^k. (With gamma = lam = 1 every token gets
                                   A_t = r_fail - V(s_t): concentrating it needs lam < 1.)
        truncated (length)         V_next = bootstrap_values[b] if given (e.g. V(s_L), the value
                                   after the last token), else V(s_{L-1}): T-PPO's extended GAE,
                                   which assumes V(s_l) ~ V(s_{l-1}) for a response cut at l, so
                                   A_t = sum_{k=0}^{L-t-1} (gamma*lam)^k delta_{t+k}.

    T-PPO trains the critic only on finished responses: weight the value loss by
    `response_mask * terminal[:, None]` to follow it.

    Args:
        token_level_rewards: [B, T], the reward on the last kept token (`trajectories_to_tensors`).
        values: [B, T], V(s_t) for each response token (anything on padding).
        response_mask: [B, T], 1 on the first L_b tokens of row b, then 0 (right padding).
        terminal: [B] bool, True for eos and espo_stop.
        bootstrap_values: [B], the value after the last token of truncated rows (None: V(s_{L-1})).
        gamma: discount.
        lam: GAE lambda.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    rewards = token_level_rewards.to(dtype)
    values = values.to(dtype)
    mask = response_mask.to(dtype)
    batch, horizon = values.shape
    lengths = mask.sum(dim=1).round().long()
    rows = torch.arange(batch, device=values.device)
    last_value = values[rows, (lengths - 1).clamp(min=0)] if horizon else torch.zeros(batch, dtype=dtype)
    bootstrap = last_value if bootstrap_values is None else bootstrap_values.to(dtype)
    final_nextvalue = torch.where(terminal.bool(), torch.zeros_like(bootstrap), bootstrap)

    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros(batch, dtype=dtype, device=values.device)
    for t in reversed(range(horizon)):
        is_last = lengths - 1 == t
        nextvalues = values[:, t + 1] if t + 1 < horizon else torch.zeros_like(lastgaelam)
        nextvalues = torch.where(is_last, final_nextvalue, nextvalues)
        nextnonterminal = (~is_last).to(dtype)  # A_{t+1} = 0 after the last kept token
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        lastgaelam = torch.where(mask[:, t] > 0, lastgaelam, torch.zeros_like(lastgaelam))  # NaN-safe
        advantages[:, t] = lastgaelam
    returns = torch.where(mask > 0, advantages + values, torch.zeros_like(values))
    return advantages, returns


def compute_gae_reference(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    terminal: torch.Tensor,
    bootstrap_values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `compute_gae`, one response and one token at a time in Python floats."""
    advantages = torch.zeros(values.shape, dtype=torch.float64)
    returns = torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        length = round(float(response_mask[b].sum()))
        r = [float(x) for x in token_level_rewards[b, :length]]
        v = [float(x) for x in values[b, :length]]
        if length == 0:
            continue
        if bool(terminal[b]):
            v_after = 0.0
        elif bootstrap_values is not None:
            v_after = float(bootstrap_values[b])
        else:
            v_after = v[-1]
        a_next = 0.0
        for t in reversed(range(length)):
            v_next = v[t + 1] if t + 1 < length else v_after
            delta = r[t] + gamma * v_next - v[t]
            a_next = delta + gamma * lam * a_next
            advantages[b, t] = a_next
            returns[b, t] = a_next + v[t]
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Learner-owned ESPO state
# ---------------------------------------------------------------------------------------------


def batch_stats(responses: RolloutResponse | Iterable[RolloutResponse]) -> BatchStats:
    """The batch statistics of one or several rollout calls (one batch), summed from their usage."""
    if isinstance(responses, RolloutResponse):
        return responses.batch_stats()
    stats = BatchStats()
    for response in responses:
        stats = stats.merge(response.batch_stats())
    return stats


def update_learner_state(
    state: protocol.EspoState,
    responses: RolloutResponse | Iterable[RolloutResponse],
    params: EspoParams | None = None,
) -> protocol.EspoState:
    """Fold one batch (one or several rollout calls) into a learner-owned ESPO state.

    The same pure code the server runs (`stop_rule.update_state`) on the summed regret moments and
    stop counts of the calls' `usage`; `params` default to those in effect in the first call. For a
    batch of one call that sent `state=`, this equals the call's own `state_after`.
    """
    responses = [responses] if isinstance(responses, RolloutResponse) else list(responses)
    if not responses:
        return state
    params = params if params is not None else responses[0].espo_params()
    return update_state(state, batch_stats(responses), params)
