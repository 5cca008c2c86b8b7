"""The ESPO stop rule's maths, checked against numbers computed by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from espo_client.stop_rule import (
    BatchStats,
    EspoParams,
    EspoState,
    ParameterError,
    StopRule,
    draw_random_stop,
    make_tracker,
    normalise,
    regret,
    smooth,
    smoothed_regret,
    threshold,
    tokens_saved,
    update_state,
)

P = EspoParams(min_tokens=0, critic_stride=1)
WARM = EspoState(mu=1.0, var=4.0, beta=20.0, warm=True, initialised=True, batches=3)


def test_formulas_by_hand():
    assert regret(-2.5, -0.5) == pytest.approx(2.0)
    assert regret(-0.5, -0.5) == 0.0  # the greedy token was sampled
    assert regret(-0.5000001, -0.5) >= 0.0
    # gn = (g - mu)/sqrt(var + delta), clipped to [-c, c]
    assert normalise(5.0, 1.0, 4.0, 0.0 + 1e-12, 5.0) == pytest.approx(2.0)
    assert normalise(100.0, 1.0, 4.0, 1e-12, 5.0) == 5.0
    assert normalise(-100.0, 1.0, 4.0, 1e-12, 5.0) == -5.0
    assert smooth(0.0, 2.0, 0.9) == pytest.approx(2.0)  # cumulative: alpha_s*z + gn
    assert smooth(2.0, 2.0, 0.9) == pytest.approx(3.8)
    assert smooth(0.0, 2.0, 0.9, cumulative=False) == pytest.approx(0.2)  # average form
    assert smooth(0.2, 2.0, 0.9, cumulative=False) == pytest.approx(0.38)
    assert threshold(7.0, 0.05, 0.2) == pytest.approx(1.4)  # V below eps: the floor applies
    assert threshold(7.0, 0.5, 0.2) == pytest.approx(3.5)


def test_smoothed_regret_sequence_by_hand():
    # g = [5, 5, 1, 9] with mu=1, var=4 -> gn = [2, 2, 0, 4]
    # z = [2, 3.8, 3.42, 7.078] (cumulative); the average form is 0.1 of it
    params = EspoParams(delta=1e-12)
    z = smoothed_regret([5.0, 5.0, 1.0, 9.0], WARM, params)
    np.testing.assert_allclose(z, [2.0, 3.8, 3.42, 7.078], atol=1e-9)
    z = smoothed_regret([5.0, 5.0, 1.0, 9.0], WARM, dataclasses.replace(params, cumulative=False))
    np.testing.assert_allclose(z, [0.2, 0.38, 0.342, 0.7078], atol=1e-9)


def test_tracker_matches_reference_loop_on_random_inputs():
    rng = np.random.default_rng(0)
    state = EspoState(mu=0.7, var=0.9, beta=3.0, warm=True, initialised=True)
    params = EspoParams()
    top = rng.normal(-1, 0.3, 200)
    sampled = top - np.abs(rng.normal(0, 1.5, 200))
    tracker = make_tracker("none", state, params)
    for s, t in zip(sampled, top, strict=True):
        tracker.step(float(s), float(t))
    np.testing.assert_allclose(tracker.g, top - sampled, atol=1e-12)
    np.testing.assert_allclose(tracker.z, smoothed_regret(top - sampled, state, params), atol=1e-12)


def feed(tracker, gs):
    """Feed regrets (top logprob 0, sampled -g); return the decisions."""
    return [tracker.step(-g, 0.0) for g in gs]


def test_espo_queries_only_above_lowest_threshold_and_stops_by_value():
    # beta*eps = 4. g=[9,9,9]: gn = 4 each; z = 4, 7.6, 10.84.
    tracker = make_tracker("espo", WARM, P)
    d = feed(tracker, [9.0])
    assert not d[0].query_value  # z_0 = 4 is not > 4
    d = feed(tracker, [9.0])
    assert d[0].query_value and tracker.pending == 1
    # V(s_1) = 0.5: threshold 20*0.5 = 10 > z_1 = 7.6: go on.
    assert tracker.resolve(1, 0.5) is False
    d = feed(tracker, [9.0])
    assert d[0].query_value  # stride 1
    # V(s_2) = 0.3: threshold 6 < z_2 = 10.84: stop at 2.
    assert tracker.resolve(2, 0.3) is True
    assert tracker.stop_step == 2
    assert tracker.values == {1: 0.5, 2: 0.3}


def test_espo_respects_stride_pending_and_min_tokens():
    params = EspoParams(min_tokens=3, critic_stride=4)
    tracker = make_tracker("espo", WARM, params)
    decisions = feed(tracker, [9.0] * 12)
    queried = [t for t, d in enumerate(decisions) if d.query_value]
    assert queried == [3]  # one pending query blocks the rest
    assert tracker.resolve(3, 0.9) is False
    decisions = feed(tracker, [9.0] * 8)
    queried = [12 + t for t, d in enumerate(decisions) if d.query_value]
    assert queried == [12]  # next allowed: stride from the last query (3 + 4 = 7 passed already)


def test_cold_or_uninitialised_state_never_stops():
    for state in (
        EspoState(mu=1, var=1, beta=0.5, warm=False, initialised=True),
        EspoState(mu=1, var=1, beta=0.5, warm=True, initialised=False),
    ):
        for rule in ("espo", "regret_only"):
            tracker = make_tracker(rule, state, P)
            assert not any(d.stop or d.query_value for d in feed(tracker, [50.0] * 50))


def test_regret_only_uses_constant_value():
    # threshold = beta * max(v_const, eps) = 20 * max(0.3, 0.2) = 6; z = 4, 7.6 -> stop at 1.
    tracker = make_tracker("regret_only", WARM, EspoParams(min_tokens=0, v_const=0.3))
    d = feed(tracker, [9.0, 9.0, 9.0])
    assert [x.stop for x in d] == [False, True, False]
    assert tracker.stop_step == 1


def test_value_only_queries_on_espos_schedule_and_stops_below_v_min():
    """value_only asks on the schedule espo asks on: at most once per critic_stride tokens, never
    with a query pending (so a slow answer delays the next query exactly as it would espo's)."""
    params = EspoParams(min_tokens=2, critic_stride=3, v_min=0.1)
    tracker = make_tracker("value_only", WARM, params)
    d = feed(tracker, [0.0] * 6)
    assert [t for t, x in enumerate(d) if x.query_value] == [2]  # pending until resolved below
    assert tracker.resolve(2, 0.5) is False
    d = feed(tracker, [0.0] * 3)
    assert [6 + t for t, x in enumerate(d) if x.query_value] == [6]  # 4 tokens since the last query
    assert tracker.resolve(6, 0.5) is False
    d = feed(tracker, [0.0] * 3)
    assert [9 + t for t, x in enumerate(d) if x.query_value] == [9]
    assert tracker.resolve(9, 0.05) is True and tracker.stop_step == 9
    # answered at once and never stopping, both ask at the same steps (espo's z is high throughout)
    asked = {}
    for rule in ("espo", "value_only"):
        tracker, asked[rule] = make_tracker(rule, WARM, params), []
        for t in range(14):
            if tracker.step(-50.0, 0.0).query_value:
                asked[rule].append(t)
                assert tracker.resolve(t, 100.0) is False
    assert asked["espo"] == asked["value_only"] == [2, 5, 8, 11]


def test_average_smoothing_is_the_cumulative_scaled_by_one_minus_alpha():
    g = [0.0, 3.0, 9.0, 1.0, 0.5, 7.0]
    cumulative = EspoParams(alpha_s=0.8)  # the default form: z_t = alpha_s*z_{t-1} + gn_t
    average = EspoParams(alpha_s=0.8, cumulative=False)
    z_cum = smoothed_regret(g, WARM, cumulative)
    z_avg = smoothed_regret(g, WARM, average)
    gn = [normalise(x, WARM.mu, WARM.var, cumulative.delta, cumulative.clip_c) for x in g]
    assert np.allclose(z_cum, [sum(0.8 ** (t - k) * gn[k] for k in range(t + 1)) for t in range(len(g))])
    assert np.allclose(z_avg, (1 - 0.8) * z_cum)
    # the same stops with beta scaled by (1 - alpha_s)
    scaled = dataclasses.replace(WARM, beta=WARM.beta * (1 - 0.8))
    stops = set()
    for z_scale in (0.3, 1.0, 3.0):
        c = make_tracker("regret_only", WARM, dataclasses.replace(cumulative, min_tokens=0))
        a = make_tracker("regret_only", scaled, dataclasses.replace(average, min_tokens=0))
        feed(c, [x * z_scale for x in g])
        feed(a, [x * z_scale for x in g])
        assert a.stop_step == c.stop_step
        stops.add(c.stop_step)
    assert len(stops) > 1  # the scales tried reach different verdicts


def test_the_paper_defaults_read_the_smoothing_as_cumulative():
    p = EspoParams()
    assert (p.cumulative, p.alpha_s, p.beta0, p.eta_beta, p.tau, p.eps) == (True, 0.9, 7.0, 0.1, 0.25, 0.2)
    assert smooth(2.0, 1.0, 0.9) == pytest.approx(2.8)
    # beta_max * eps lies above the largest cumulative z, c / (1 - alpha_s): at the clip nothing stops
    assert p.beta_max * p.eps > p.clip_c / (1 - p.alpha_s)


def test_random_rule_stops_at_drawn_step():
    params = EspoParams(min_tokens=2, random_rate=1.0)
    rng = np.random.default_rng(1)
    at = draw_random_stop(rng, params, max_tokens=10)
    assert at is not None and 2 <= at < 10
    tracker = make_tracker("random", WARM, params, random_stop_at=at)
    d = feed(tracker, [0.0] * 10)
    assert [t for t, x in enumerate(d) if x.stop] == [at]
    assert draw_random_stop(rng, EspoParams(random_rate=0.0), 10) is None
    rates = [
        draw_random_stop(np.random.default_rng(i), EspoParams(random_rate=0.25), 100) is not None
        for i in range(2000)
    ]
    assert 0.2 < np.mean(rates) < 0.3


def test_critic_failure_fallbacks():
    tracker = make_tracker("espo", WARM, P, critic_fallback="no_stop")
    feed(tracker, [9.0, 9.0])
    assert tracker.resolve(1, None) is False and tracker.values[1] is None
    tracker = make_tracker("espo", WARM, P, critic_fallback="regret_only")
    feed(tracker, [9.0, 9.0])
    # regret-only fallback: z_1 = 7.6 > beta*max(v_const=0, eps) = 4
    assert tracker.resolve(1, None) is True


def test_first_batch_initialises_and_never_moves_beta():
    params = EspoParams()
    state = EspoState.fresh(params)
    stats = BatchStats()
    stats.add_trajectory([1.0, 3.0], stopped=False)
    stats.add_trajectory([2.0], stopped=False)
    new = update_state(state, stats, params)
    assert new.initialised and new.batches == 1
    assert new.mu == pytest.approx(2.0)
    assert new.var == pytest.approx(2.0 / 3.0)  # population variance of [1, 3, 2]
    assert new.beta == params.beta0  # a cold batch does not move beta
    assert not new.warm


def test_ema_update_and_beta_controller_by_hand():
    params = EspoParams()
    state = EspoState(mu=1.0, var=2.0, beta=7.0, warm=True, initialised=True, batches=5)
    stats = BatchStats()
    stats.add_trajectory([3.0, 3.0], stopped=True)  # mean 3, var 0
    stats.add_trajectory([3.0], stopped=False)
    new = update_state(state, stats, params)
    assert new.mu == pytest.approx(0.99 * 1.0 + 0.01 * 3.0)
    assert new.var == pytest.approx(0.99 * 2.0)
    # stop rate 1/2 above tau 0.25: beta grows by 0.1*0.25 (stopping gets harder)
    assert new.beta == pytest.approx(7.0 + 0.1 * (0.5 - 0.25))
    assert new.batches == 6
    clipped = update_state(
        EspoState(beta=0.51, warm=True, initialised=True), BatchStats(1, 1.0, 1.0, 4, 0), params
    )
    assert clipped.beta == params.beta_min


def test_batch_stats_merge_exactly():
    a, b = BatchStats(), BatchStats()
    rng = np.random.default_rng(3)
    all_g = []
    for i in range(10):
        g = rng.random(7)
        all_g.append(g)
        (a if i % 2 else b).add_trajectory(g, stopped=i % 3 == 0)
    merged = a.merge(b)
    assert merged.tokens == 70 and merged.stops == 4 and merged.trajectories == 10
    assert merged.g_mean == pytest.approx(np.mean(np.concatenate(all_g)))
    assert merged.g_var == pytest.approx(np.var(np.concatenate(all_g)))


def test_warm_after_batches():
    params = EspoParams(warm_after_batches=2)
    stats = BatchStats(10, 10.0, 20.0, 2, 0)
    s1 = update_state(EspoState.fresh(params), stats, params)
    s2 = update_state(s1, stats, params)
    assert not s1.warm and s2.warm


def test_params_validation_and_overrides():
    with pytest.raises(ValueError, match="beta_max"):
        EspoParams(beta_min=5, beta_max=1)
    for bad in ({"beta_min": 0.0}, {"beta0": 0.0}, {"eta_beta": math.nan}, {"eps": math.inf}, {"delta": 0}):
        with pytest.raises(ParameterError) as info:
            EspoParams(**bad)
        assert info.value.field == next(iter(bad))
    with pytest.raises(KeyError, match="nope"):
        EspoParams().with_overrides({"nope": 1})
    assert EspoParams().with_overrides({"tau": 0.5}).tau == 0.5


def test_tokens_saved():
    # two stopped at steps 9 and 19; unstopped lengths 50 and 30 (mean 40); max_tokens 100
    est, upper = tokens_saved([9, 19], [50, 30], 100)
    assert est == (40 - 10) + (40 - 20)
    assert upper == (100 - 10) + (100 - 20)
    est, upper = tokens_saved([9], [], 100)  # nothing unstopped: L = max_tokens
    assert est == upper == 90
    assert tokens_saved([], [5], 100) == (0, 0)


def test_stop_rule_names():
    assert {r.value for r in StopRule} == {"none", "espo", "random", "regret_only", "value_only"}
    assert math.isfinite(EspoParams().beta0)


def test_rebase_judges_later_tokens_with_the_new_state_and_pending_ones_with_theirs():
    """A carried-over sample switches to a new batch's frozen state; a decision pending for an
    earlier step is still taken with the state that judged that step."""
    params = EspoParams(min_tokens=0, critic_stride=1, eps=0.2)
    old = EspoState(mu=0.0, var=1.0, beta=1.0, warm=True, initialised=True)
    new = EspoState(mu=0.0, var=1.0, beta=50.0, warm=True, initialised=True)
    tracker = make_tracker("espo", old, params)
    assert feed(tracker, [5.0])[0].query_value  # z_0 = 0.5 > beta*eps = 0.2: asks the critic for t=0
    tracker.rebase(new)
    assert tracker.state_at(0) is old and tracker.state_at(1) is new
    assert not feed(tracker, [5.0])[0].query_value  # pending, and under beta 50 no query anyway
    assert tracker.resolve(0, 0.3)  # judged with old: z_0 = 0.5 > 1.0 * max(0.3, 0.2)
    fresh = make_tracker("espo", old, params)
    feed(fresh, [5.0])
    fresh.rebase(new)
    fresh.earlier_states.clear()  # what forgetting the old state would do: judged with beta 50
    assert not fresh.resolve(0, 0.3)
