"""The end of a call as pure code (espo_server/fold.py), on hand-made trajectories: no engine, no
service. Every figure below is worked out by hand from the inputs."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from espo_client.protocol import Carried, Prompt, RolloutRequest, Trajectory, Usage
from espo_client.stop_rule import BatchStats, EspoParams, EspoState, StopRule, update_state
from espo_server import fold
from espo_server.plan import CallPlan
from espo_server.sample import SampleResult

MAX_TOKENS = 20


def trajectory(prompt: int, sample: int, length: int, end: str = "length", **kw) -> Trajectory:
    return Trajectory(
        prompt_index=prompt,
        sample_index=sample,
        token_ids=[7] * length,
        logprobs=[-1.0] * length,
        end_reason=end,
        policy_version=0,
        **kw,
    )


def returned(
    t: Trajectory, *, full_length: int | None = None, prompt_tokens: int = 3, **measured
) -> fold.Returned:
    result = SampleResult(
        trajectory=t,
        g=[],
        rule_stopped=t.stop_step is not None or t.shadow_stop_step is not None,
        steers_beta=True,
        full_length=len(t.token_ids) if full_length is None else full_length,
        **measured,
    )
    return fold.Returned(t, result, prompt_tokens)


def carried(request_id: str) -> Carried:
    return Carried(request_id=request_id, prompt_token_ids=[1, 2], stop_rule=StopRule.ESPO, shadow=False)


def usage(items: list[fold.Returned], stats=None, **kw) -> Usage:
    args = dict(
        max_tokens=MAX_TOKENS, wall_time_s=1.25, groups_returned=1, groups_carried=0, deadline_hit=False
    )
    return fold.usage(items, stats or BatchStats(), **(args | kw))


def test_batch_stats_sum_regret_and_count_stops_where_they_steer_beta():
    stats = fold.batch_stats([([1.0, 2.0], True), ([3.0], False), ([4.0], None), ([], None)])
    assert (stats.tokens, stats.g_sum, stats.g_sumsq) == (4, 10.0, 1 + 4 + 9 + 16)
    assert (stats.trajectories, stats.stops) == (2, 1)  # None: counted toward mu/var only


def test_tokens_saved_are_estimated_against_the_unstopped_and_bounded_by_max_tokens():
    items = [
        returned(trajectory(0, 0, 10, "eos")),
        returned(trajectory(0, 1, 14, "length")),
        returned(trajectory(0, 2, 4, "espo_stop", stop_step=3, discarded_tokens=2), full_length=6),
        returned(trajectory(0, 3, 2, "abort")),  # neither stopped nor a length to compare with
    ]
    u = usage(items)
    # mean unstopped length (10 + 14) / 2 = 12; the stop kept 3 + 1 tokens: 12 - 4 = 8 saved
    assert u.tokens_saved_estimate == 8 and u.tokens_saved_upper_bound == MAX_TOKENS - 4
    assert (u.trajectories, u.stopped, u.aborted, u.discarded_tokens) == (4, 1, 1, 2)
    assert u.generated_tokens == 10 + 14 + 4 + 2 and u.prompt_tokens == 4 * 3


def test_engine_tokens_count_what_the_engine_generated_kept_and_discarded():
    items = [
        returned(trajectory(0, 0, 10, "eos")),
        returned(trajectory(0, 1, 4, "espo_stop", stop_step=3, discarded_tokens=2), full_length=6),
        returned(trajectory(0, 2, 5, "espo_stop", stop_step=4, discarded_tokens=3), full_length=8),
    ]
    u = usage(items)
    assert (u.generated_tokens, u.discarded_tokens, u.engine_tokens) == (10 + 4 + 5, 2 + 3, 19 + 5)
    # a Usage from anyone who leaves it out (an older server, a fake) derives it the same way
    assert Usage(prompt_tokens=0, generated_tokens=7, discarded_tokens=2, trajectories=1).engine_tokens == 9
    assert Usage.model_validate(u.model_dump()).engine_tokens == 24


def test_without_unstopped_trajectories_the_estimate_uses_max_tokens():
    u = usage([returned(trajectory(0, 0, 5, "espo_stop", stop_step=4))])
    assert u.tokens_saved_estimate == u.tokens_saved_upper_bound == MAX_TOKENS - 5


def test_shadow_savings_are_exact_per_trajectory():
    items = [
        returned(trajectory(0, 0, 12, shadow_stop_step=2)),  # would have kept 3 of 12
        returned(trajectory(0, 1, 8, "eos", shadow_stop_step=6)),  # 7 of 8
        returned(trajectory(0, 2, 9)),
    ]
    u = usage(items)
    assert u.shadow_stopped == 2 and u.tokens_saved_shadow == (12 - 3) + (8 - 7)
    assert u.stopped == 0 and u.tokens_saved_estimate == 0


def test_usage_sums_what_the_samples_measured_and_carries_the_batch_sums():
    measured = dict(critic_calls=2, critic_errors=1, critic_time_s=0.5, lifetime_s=2.0, critic_tokens=9)
    items = [
        returned(trajectory(0, 0, 3), **measured, critic_prefix_tokens=30),
        returned(trajectory(1, 0, 3, carried=carried("earlier")), **measured, critic_prefix_tokens=40),
    ]
    stats = fold.batch_stats([([0.5, 1.5], True)])
    u = usage(items, stats, groups_returned=2, groups_carried=3, deadline_hit=True)
    assert (u.critic_calls, u.critic_errors, u.critic_tokens, u.critic_prefix_tokens) == (4, 2, 18, 70)
    assert u.critic_time_s == 1.0 and u.trajectory_time_s == 4.0 and u.wall_time_s == 1.25
    assert (u.groups_returned, u.groups_carried, u.deadline_hit, u.carried_in) == (2, 3, True, 1)
    assert (u.regret_tokens, u.regret_sum, u.regret_sumsq) == (2, 2.0, 2.5)


def test_order_puts_this_calls_groups_first_then_carried_ones_by_their_call():
    ts = [
        trajectory(1, 0, 1, carried=carried("b")),
        trajectory(2, 1, 1),
        trajectory(0, 0, 1, carried=carried("a")),
        trajectory(0, 1, 1),
        trajectory(2, 0, 1),
    ]
    key = [
        (t.carried.request_id if t.carried else "", t.prompt_index, t.sample_index)
        for t in sorted(ts, key=fold.order)
    ]
    assert key == [("", 0, 1), ("", 2, 0), ("", 2, 1), ("a", 0, 0), ("b", 1, 0)]


@pytest.mark.parametrize("text_prompt", [False, True])
def test_the_response_says_what_the_call_ran_under(text_prompt):
    prompt = Prompt(text="ab") if text_prompt else Prompt(token_ids=[1, 2])
    state = EspoState(mu=1.0, var=1.0, beta=2.0, warm=True, initialised=True, batches=4)
    plan = CallPlan(
        request=RolloutRequest(prompts=[prompt], n=2, shadow=True, run_id="r"),
        request_id="call",
        prompt_ids=[[1, 2]],
        rule=StopRule.ESPO,
        params=EspoParams(),
        top_k_logprobs=1,
        scorers=[None],
        state=state,
        policy_version=3,
    )
    items = [returned(trajectory(0, 1, 2)), returned(trajectory(0, 0, 2))]
    stats = fold.batch_stats([([1.0, 2.0], False), ([3.0, 4.0], True)])
    after = update_state(state, stats, plan.params)
    answer = fold.response(plan, items, usage(items, stats), after)
    assert [t.sample_index for t in answer.trajectories] == [0, 1]
    assert answer.request_id == "call" and answer.stop_rule is StopRule.ESPO and answer.shadow
    assert answer.state_used == state and answer.state_after == after and after.batches == 5
    assert answer.rule_params == asdict(EspoParams()) and answer.policy_version == 3 and answer.run_id == "r"
    assert answer.prompt_token_ids == ([[1, 2]] if text_prompt else None)  # the tokenisation of text
