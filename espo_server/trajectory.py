"""What a sample's loop measured -> the Trajectory the learner receives (pure).

end_reason   eos (the model ended), length (max_tokens), espo_stop (the rule), abort
reward       r_fail on a stop's last kept token, the verifier's on an eos, else none
traces       per-token regret, z, critic values, entropy estimate, top-k logprobs
version_spans which policy version sampled which tokens (a sample carried across a push has two)
"""

from __future__ import annotations

from espo_client.entropy_espo import topk_entropy
from espo_client.protocol import EndReason, Traces, VersionSpan
from espo_client.stop_rule import TrajectoryTracker

_FINISH_REASONS: dict[str, EndReason] = {"stop": "eos", "length": "length", "abort": "abort"}
"""vLLM's finish_reason -> ours."""


def end_reason(stop_step: int | None, finish_reason: str | None, aborted: bool) -> EndReason:
    """A stop by the rule, an abort by us, or how the engine ended the request."""
    if stop_step is not None:
        return "espo_stop"
    if aborted:
        return "abort"
    return _FINISH_REASONS.get(finish_reason or "abort", "abort")


def reward(end: EndReason, r_fail: float, score: float | None) -> float | None:
    """The reward on the last kept token: r_fail for a stop (an absorbing failure), the verifier's
    score for an eos (None: the learner scores it); none for a cut (length) or an abort."""
    if end == "espo_stop":
        return r_fail
    return score if end == "eos" else None


def trajectory_traces(
    include: frozenset[str],
    tracker: TrajectoryTracker,
    kept: int,
    *,
    topk: list[list[float]],
    topk_ids: list[list[int]],
    vocab_size: int,
) -> Traces:
    """The per-token traces asked for, of the first `kept` tokens (`topk`: the top-k logprobs of each
    step, `topk_ids` their token ids)."""
    return Traces(
        regret=tracker.g[:kept] if "regret" in include else None,
        z=tracker.z[:kept] if "z" in include else None,
        values=[tracker.values.get(t) for t in range(kept)] if "values" in include else None,
        entropy=[topk_entropy(lp, vocab_size) for lp in topk[:kept]] if "entropy" in include else None,
        top_token_ids=topk_ids[:kept] if "top_logprobs" in include else None,
        top_logprobs=topk[:kept] if "top_logprobs" in include else None,
    )


def version_spans(starts: list[tuple[int, int]], kept: int) -> list[VersionSpan]:
    """Segments (first index, version) -> non-empty spans [start, end) of the kept tokens, adjacent
    segments of one version merged."""
    spans: list[VersionSpan] = []
    for i, (start, version) in enumerate(starts):
        end = min(kept, starts[i + 1][0] if i + 1 < len(starts) else kept)
        if end <= start:
            continue
        if spans and spans[-1].version == version and spans[-1].end == start:
            spans[-1] = VersionSpan(start=spans[-1].start, end=end, version=version)
        else:
            spans.append(VersionSpan(start=start, end=end, version=version))
    return spans
