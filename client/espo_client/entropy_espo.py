"""Entropy-ESPO (Entropy Importance Sampling Policy Optimization) helpers.

`topk_entropy` is numpy-only (the server imports it to fill the `entropy` trace); everything else
needs torch, imported inside the functions, so this module imports without torch.

Per-token entropy of the old policy: e_t = -sum_v pi_old(v|s_t) log pi_old(v|s_t).

1. Entropy groups. Within each sequence, the ceil(q*L) highest-entropy tokens form one group and
   the rest another (groups need not be contiguous; the paper's best ablation is q ~ 0.2):
   `entropy_groups` -> group ids, 0 = high entropy, 1 = the rest, -1 = padding.
2. Group importance ratio, applied per token GSPO-token style:
       s_tau   = exp( mean_{t in tau} (log pi_theta(y_t) - log pi_old(y_t)) )
       s_{t}   = sg[s_tau] * pi_theta(y_t) / sg[pi_theta(y_t)]
   The value of s_t is the group's ratio; its gradient is s_tau * grad log pi_theta(y_t). (The
   paper's printed per-token form differs; this is the GSPO-token form, probably what was meant.)
3. Entropy-adaptive clip range, symmetric [1 - eps_tau, 1 + eps_tau]:
       eps_tau = alpha * mean_{t in tau}(e_t) / log|V|,     alpha = 0.02
   so a group of uncertain tokens gets a wider trust region; eps_tau <= alpha since e_t <= log|V|.
4. Objective (maximised; the loss is its negative), a mean over sequences, then over each
   sequence's non-empty groups, then over the group's tokens:
       J = mean_i mean_tau mean_{t in tau} min( s_t * A_t, clip(s_t, 1 - eps_tau, 1 + eps_tau) * A_t )
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the learner-side functions below
    import torch

__all__ = [
    "adaptive_clip_range",
    "entropy_espo_loss",
    "entropy_from_logits",
    "entropy_groups",
    "group_mean",
    "group_ratio",
    "topk_entropy",
]

HIGH, REST, PAD = 0, 1, -1
"""Group ids returned by `entropy_groups`."""


def topk_entropy(topk_logprobs: np.ndarray | list[float], vocab_size: int) -> np.ndarray | float:
    """Estimate the entropy H = -sum_v p_v log p_v of a distribution from its top-k log-probabilities.

    With p_1..p_k the top-k probabilities and m = max(0, 1 - sum_i p_i) the mass left over for the
    other V - k tokens, the estimate assumes that mass is spread uniformly over them:

        H_k = -sum_{i<=k} p_i log p_i  -  m * log(m / (V - k))          (the last term 0 if m = 0)

    It is exact when k = V (m = 0) and when the tail really is uniform. For a fixed top-k the
    uniform tail has the most entropy, so (as long as m/(V-k) <= p_k, true for any sensible k) this
    is an upper bound; -sum p_i log p_i - m * log(p_k) is the matching lower bound.

    Args:
        topk_logprobs: [..., k] log-probabilities of the top-k tokens (any order; -inf allowed for
            padding of ragged rows). Raw (pre-temperature) logprobs give the policy's entropy.
        vocab_size: V, at least k.
    Returns:
        [...] entropies in nats (a float for a 1-D input).
    """
    logp = np.asarray(topk_logprobs, dtype=np.float64)
    k = logp.shape[-1]
    if vocab_size < k:
        raise ValueError(f"vocab_size ({vocab_size}) is smaller than k ({k})")
    p = np.exp(logp)
    head = -np.sum(np.where(p > 0, p * np.where(np.isfinite(logp), logp, 0.0), 0.0), axis=-1)
    rest = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    tail_tokens = vocab_size - k
    if tail_tokens == 0:
        return head
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(rest > 0, -rest * np.log(rest / tail_tokens), 0.0)
    return head + tail


# ---------------------------------------------------------------------------------------------
# Learner side (torch)
# ---------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact per-token entropy -sum_v p_v log p_v over the last axis ([..., V] -> [...])."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_groups(
    entropy: torch.Tensor, response_mask: torch.Tensor, top_fraction: float = 0.2
) -> torch.Tensor:
    """Group ids [B, T]: HIGH (0) for the ceil(top_fraction * L_b) highest-entropy tokens of each
    sequence, REST (1) for its other tokens, PAD (-1) where response_mask is 0. Ties go to the
    earlier token. A sequence with L_b >= 1 has at least one HIGH token when top_fraction > 0."""
    import torch

    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
    valid = response_mask.bool()
    lengths = valid.sum(dim=1).to(torch.float64)
    n_high = (
        torch.ceil(lengths * top_fraction - 1e-9).clamp(min=0).long()
    )  # 1e-9: 0.2*5 is 1.0000000000000002
    ranked = torch.where(
        valid, entropy.to(torch.float64), torch.full_like(entropy, -math.inf, dtype=torch.float64)
    )
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(entropy.shape[1], device=entropy.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    groups = torch.where(rank < n_high[:, None], HIGH, REST)
    return torch.where(valid, groups, PAD)


def group_mean(x: torch.Tensor, group_ids: torch.Tensor, num_groups: int = 2) -> torch.Tensor:
    """For each token, the mean of x over its group in its sequence ([B, T]; 0 on padding)."""
    import torch

    valid = group_ids >= 0
    index = group_ids.clamp(min=0).long()
    x = torch.where(valid, x, torch.zeros_like(x))
    sums = torch.zeros(x.shape[0], num_groups, dtype=x.dtype, device=x.device).scatter_add(1, index, x)
    counts = torch.zeros_like(sums).scatter_add(1, index, valid.to(x.dtype))
    means = sums / counts.clamp(min=1)
    return torch.where(valid, means.gather(1, index), torch.zeros_like(x))


def group_ratio(
    logp_new: torch.Tensor, logp_old: torch.Tensor, group_ids: torch.Tensor, num_groups: int = 2
) -> torch.Tensor:
    """Per-token ratio sg[s_tau] * pi_theta(y_t) / sg[pi_theta(y_t)], with
    s_tau = exp(mean_{t in tau}(log pi_theta(y_t) - log pi_old(y_t))) ([B, T]; 1 on padding)."""
    import torch

    log_ratio = (logp_new - logp_old).detach()
    s_group = torch.exp(group_mean(log_ratio, group_ids, num_groups))
    return s_group * torch.exp(logp_new - logp_new.detach())


def adaptive_clip_range(
    entropy: torch.Tensor, group_ids: torch.Tensor, vocab_size: int, alpha: float = 0.02, num_groups: int = 2
) -> torch.Tensor:
    """Per-token eps_tau = alpha * mean_{t in tau}(e_t) / log|V| of the token's group ([B, T])."""
    return alpha * group_mean(entropy.detach(), group_ids, num_groups) / math.log(vocab_size)


def entropy_espo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    vocab_size: int,
    *,
    top_fraction: float = 0.2,
    alpha: float = 0.02,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Entropy-ESPO policy loss -J (see the module docstring) and some statistics.

    Args:
        logp_new: [B, T] log pi_theta(y_t), with gradient.
        logp_old: [B, T] log pi_old(y_t) (the rollout's `old_logprobs`).
        advantages: [B, T] per token, or [B] per sequence.
        entropy: [B, T] e_t under the old policy (exact, or the server's top-k `entropy` trace).
        response_mask: [B, T] 1 on trained tokens.
        vocab_size: |V| of the clip range's normaliser.
        top_fraction: q, the share of each sequence's tokens in the high-entropy group.
        alpha: the clip range's scale.
        group_ids: precomputed groups (default: `entropy_groups(entropy, response_mask, top_fraction)`).
    Returns:
        (loss, {"clip_fraction", "ratio_mean", "eps_high", "eps_rest"}) — token-weighted means.
    """
    import torch

    if group_ids is None:
        group_ids = entropy_groups(entropy, response_mask, top_fraction)
    num_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 1
    num_groups = max(num_groups, 2)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp_new)
    ratio = group_ratio(logp_new, logp_old, group_ids, num_groups)
    eps = adaptive_clip_range(entropy, group_ids, vocab_size, alpha, num_groups)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * advantages
    objective = torch.minimum(unclipped, clipped)

    # mean over tokens of each group, then over the sequence's non-empty groups, then over sequences
    valid = group_ids >= 0
    index = group_ids.clamp(min=0).long()
    zeros = torch.zeros(logp_new.shape[0], num_groups, dtype=objective.dtype, device=objective.device)
    sums = zeros.scatter_add(1, index, torch.where(valid, objective, torch.zeros_like(objective)))
    counts = zeros.scatter_add(1, index, valid.to(objective.dtype))
    present = counts > 0
    per_group = sums / counts.clamp(min=1)
    groups_per_seq = present.sum(dim=1)
    per_seq = per_group.sum(dim=1) / groups_per_seq.clamp(min=1)
    has_tokens = groups_per_seq > 0
    j = per_seq[has_tokens].mean() if bool(has_tokens.any()) else objective.sum() * 0.0
    loss = -j

    with torch.no_grad():
        n = valid.sum().clamp(min=1)
        was_clipped = (clipped < unclipped) & valid
        high, rest = group_ids == HIGH, group_ids == REST
        stats = {
            "clip_fraction": float(was_clipped.sum() / n),
            "ratio_mean": float(torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / n),
            "eps_high": float(eps[high].mean()) if bool(high.any()) else 0.0,
            "eps_rest": float(eps[rest].mean()) if bool(rest.any()) else 0.0,
        }
    return loss, stats
