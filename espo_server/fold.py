"""The end of a call, as pure code: the batch's statistics, the usage with the tokens saved, the
order of the trajectories, the response. No engine, no I/O, no clock: the call (call.py) gathers
what its samples measured and folds it here; the state update itself is
`espo_client.stop_rule.update_state`, the code a learner that owns its state runs.

The batch holds every kept token a sample generated since a batch last took its tokens (a sample
carried over splits its regret at the call boundary: docs/algorithm.md, "Carried over"), and the
stop-rate count of each trajectory that ended since (`Sample.batch_share`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from espo_client.protocol import RolloutResponse, Trajectory, Usage
from espo_client.stop_rule import BatchStats, EspoState, tokens_saved

from .plan import CallPlan
from .sample import SampleResult

Share = tuple[list[float], bool | None]
"""What one sample adds to a batch: the regret of its new tokens, and whether the rule stopped it
(None: it does not count toward the stop rate)."""


@dataclass(frozen=True)
class Returned:
    """A sample the call returns: its trajectory as sent, and what its loop measured."""

    trajectory: Trajectory
    result: SampleResult
    prompt_tokens: int


def batch_stats(shares: Iterable[Share]) -> BatchStats:
    """The batch's sums (BatchStats merge exactly, so the calls of one batch_id add up)."""
    stats = BatchStats()
    for g, stopped in shares:
        stats.add_trajectory(g, stopped)
    return stats


def order(trajectory: Trajectory) -> tuple:
    """This call's groups in prompt order, then carried-over ones by the call that started them."""
    origin = trajectory.carried.request_id if trajectory.carried else ""
    return (trajectory.carried is not None, origin, trajectory.prompt_index, trajectory.sample_index)


def usage(
    returned: Sequence[Returned],
    stats: BatchStats,
    *,
    max_tokens: int,
    wall_time_s: float,
    groups_returned: int,
    groups_carried: int,
    deadline_hit: bool,
) -> Usage:
    """What the call cost and saved. Tokens saved by a stop: estimated against the mean length of
    the call's trajectories that were not stopped (`max_tokens` if none), bounded by `max_tokens`;
    exact in shadow mode (each trajectory's own full length)."""
    trajectories = [r.trajectory for r in returned]
    results = [r.result for r in returned]
    stopped = [t for t in trajectories if t.end_reason == "espo_stop"]
    unstopped_lengths = [len(t.token_ids) for t in trajectories if t.end_reason in ("eos", "length")]
    estimate, upper = tokens_saved([t.stop_step for t in stopped], unstopped_lengths, max_tokens)
    shadow = [r for r in results if r.trajectory.shadow_stop_step is not None]
    shadow_saved = sum(r.full_length - (r.trajectory.shadow_stop_step + 1) for r in shadow)
    generated = sum(len(t.token_ids) for t in trajectories)
    discarded = sum(t.discarded_tokens for t in trajectories)
    return Usage(
        prompt_tokens=sum(r.prompt_tokens for r in returned),
        generated_tokens=generated,
        discarded_tokens=discarded,
        engine_tokens=generated + discarded,
        trajectories=len(trajectories),
        stopped=len(stopped),
        shadow_stopped=len(shadow),
        tokens_saved_estimate=estimate,
        tokens_saved_upper_bound=upper,
        tokens_saved_shadow=shadow_saved,
        critic_calls=sum(r.critic_calls for r in results),
        critic_errors=sum(r.critic_errors for r in results),
        critic_time_s=round(sum(r.critic_time_s for r in results), 6),
        critic_tokens=sum(r.critic_tokens for r in results),
        critic_prefix_tokens=sum(r.critic_prefix_tokens for r in results),
        trajectory_time_s=round(sum(r.lifetime_s for r in results), 6),
        wall_time_s=round(wall_time_s, 6),
        groups_returned=groups_returned,
        groups_carried=groups_carried,
        carried_in=sum(t.carried is not None for t in trajectories),
        aborted=sum(t.end_reason == "abort" for t in trajectories),
        deadline_hit=deadline_hit,
        regret_tokens=stats.tokens,
        regret_sum=stats.g_sum,
        regret_sumsq=stats.g_sumsq,
    )


def response(
    plan: CallPlan, returned: Sequence[Returned], usage: Usage, state_after: EspoState | None
) -> RolloutResponse:
    """The call's answer: its trajectories in `order`, with what the call ran under."""
    request = plan.request
    assert plan.state is not None, "the state is read when the call starts"
    return RolloutResponse(
        request_id=plan.request_id,
        trajectories=sorted((r.trajectory for r in returned), key=order),
        usage=usage,
        stop_rule=plan.rule,
        shadow=request.shadow,
        rule_params=asdict(plan.params),
        state_used=plan.state,
        state_after=state_after,
        policy_version=plan.policy_version,
        run_id=request.run_id,
        prompt_token_ids=plan.prompt_ids if any(p.text is not None for p in request.prompts) else None,
    )
