"""Every rule's tracker against a plain reference loop written from the formulas (hypothesis).

The reference below is written again from docs/algorithm.md, not from stop_rule.py: one loop over
the tokens, the paper's symbols, the critic answering `latency` tokens after it was asked (0: at
once), answers lost where the critic failed. For random regret and value sequences, random states
and parameters, it must give the same stop step, the same z trace and the same queried steps as
the tracker driven the way the server drives it (sample.py: feed a token, resolve a query whose
answer has arrived, resolve a pending one when the stream ends).
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from espo_client.stop_rule import (
    REGRET_CAP,
    BatchStats,
    EspoParams,
    EspoState,
    StopRule,
    make_tracker,
    regret,
    update_state,
)


def reference(rule, g, values, state, p, latency, fallback, random_stop_at):
    """(stop step or None, z trace, queried steps) of one trajectory, straight from the formulas."""
    z, zs, queried = 0.0, [], []
    pending = last_query = None
    armed = state.warm and state.initialised

    def stops_with(t, v):
        if v is None:  # the critic failed: no_stop, or decide as regret_only would
            regret_only = armed and t >= p.min_tokens and zs[t] > state.beta * max(p.v_const, p.eps)
            return fallback == "regret_only" and regret_only
        if rule == "value_only":
            return v < p.v_min
        return zs[t] > state.beta * max(v, p.eps)

    for t, g_t in enumerate(g):
        gn = min(p.clip_c, max(-p.clip_c, (g_t - state.mu) / math.sqrt(state.var + p.delta)))
        z = p.alpha_s * z + (gn if p.cumulative else (1 - p.alpha_s) * gn)
        zs.append(z)
        if rule == "random" and state.warm and t == random_stop_at:
            return t, zs, queried
        if rule == "regret_only" and armed and t >= p.min_tokens and z > state.beta * max(p.v_const, p.eps):
            return t, zs, queried
        if pending is None:
            # one critic schedule for every rule that asks: at most once per critic_stride tokens
            stride_ok = last_query is None or t - last_query >= p.critic_stride
            ask = False
            if rule == "espo":
                ask = armed and t >= p.min_tokens and z > state.beta * p.eps and stride_ok
            elif rule == "value_only":
                ask = state.warm and t >= p.min_tokens and stride_ok
            if ask:
                pending = last_query = t
                queried.append(t)
        if pending is not None and t - pending >= latency:
            asked, pending = pending, None
            if stops_with(asked, values[asked]):
                return asked, zs, queried
    if pending is not None and stops_with(pending, values[pending]):  # the stream ended meanwhile
        return pending, zs, queried
    return None, zs, queried


def drive(rule, g, values, state, p, latency, fallback, random_stop_at):
    """The tracker, driven like sample.py drives it."""
    tracker = make_tracker(rule, state, p, critic_fallback=fallback, random_stop_at=random_stop_at)
    pending, queried = None, []
    for t, g_t in enumerate(g):
        decision = tracker.step(-g_t, 0.0)  # sampled logprob -g, top logprob 0: regret g
        if decision.stop:
            return t, tracker.z, queried
        if decision.query_value:
            assert pending is None, "a second query while one is pending"
            pending = t
            queried.append(t)
        if pending is not None and t - pending >= latency:
            asked, pending = pending, None
            if tracker.resolve(asked, values[asked]):
                return asked, tracker.z, queried
    if pending is not None and tracker.resolve(pending, values[pending]):
        return pending, tracker.z, queried
    return None, tracker.z, queried


# Values and thresholds share a few round numbers, so that ties (V == v_min, V == eps) come up.
ROUND = [-0.5, 0.0, 0.1, 0.2, 0.5, 1.0]
values = st.one_of(st.none(), st.sampled_from(ROUND), st.floats(-1.5, 1.5))
mostly_true = st.sampled_from([True, True, True, False])
regrets = st.lists(st.one_of(st.floats(0.0, 12.0), st.sampled_from([0.0, 0.5, 3.0])), min_size=1, max_size=60)
states = st.builds(
    EspoState,
    mu=st.floats(0.0, 3.0),
    var=st.floats(0.0, 4.0),
    beta=st.floats(0.05, 10.0),
    warm=mostly_true,
    initialised=mostly_true,
)
params = st.builds(
    EspoParams,
    alpha_s=st.floats(0.0, 1.0),
    cumulative=st.booleans(),
    eps=st.one_of(st.sampled_from(ROUND[1:]), st.floats(0.0, 1.0)),
    clip_c=st.floats(0.5, 8.0),
    delta=st.floats(1e-9, 1e-2),
    min_tokens=st.integers(0, 10),
    critic_stride=st.integers(1, 10),
    v_const=st.one_of(st.sampled_from(ROUND), st.floats(-1.0, 1.0)),
    v_min=st.one_of(st.sampled_from(ROUND), st.floats(-1.0, 1.0)),
)


@settings(max_examples=1500, deadline=None)
@given(
    rule=st.sampled_from([r.value for r in StopRule]),
    g=regrets,
    value_seq=st.lists(values, min_size=60, max_size=60),
    state=states,
    p=params,
    latency=st.integers(0, 4),
    fallback=st.sampled_from(["no_stop", "regret_only"]),
    random_stop_at=st.one_of(st.none(), st.integers(0, 70)),
)
def test_every_rule_matches_the_reference_loop(
    rule, g, value_seq, state, p, latency, fallback, random_stop_at
):
    want = reference(rule, g, value_seq, state, p, latency, fallback, random_stop_at)
    got = drive(rule, g, value_seq, state, p, latency, fallback, random_stop_at)
    assert got[0] == want[0], f"stop step: tracker {got[0]}, reference {want[0]}"
    assert got[2] == want[2], "queried steps differ"
    assert len(got[1]) >= len(want[1])
    for mine, theirs in zip(got[1], want[1], strict=False):
        assert math.isclose(mine, theirs, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# The batch update at the parameters' edges: always a valid state
# ---------------------------------------------------------------------------------------------

edge = st.sampled_from([0.0, 1e-12, 1e-6, 0.5, 1.0])
edge_params = st.builds(
    EspoParams,
    a_ema=st.one_of(edge, st.floats(0.0, 1.0)),
    eta_beta=st.one_of(st.sampled_from([0.0, 1.0, 1e6]), st.floats(0.0, 100.0)),
    tau=st.one_of(edge, st.floats(0.0, 1.0)),
    beta_min=st.one_of(st.sampled_from([1e-12, 1e-6, 0.5]), st.floats(1e-9, 10.0)),
    beta_max=st.one_of(st.sampled_from([10.0, 50.0, 1e9]), st.floats(10.0, 1e6)),
    warm_after_batches=st.one_of(st.none(), st.integers(0, 3)),
)
batches = st.lists(
    st.tuples(
        st.lists(st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, 1e3])), max_size=30),
        st.one_of(st.none(), st.booleans()),
    ),
    max_size=12,
)


@settings(max_examples=600, deadline=None)
@given(p=edge_params, state=states, trajectories=batches, steps=st.integers(1, 4))
def test_update_state_keeps_the_state_valid_at_every_edge(p, state, trajectories, steps):
    """No parameter combination that EspoParams accepts drives the state out of range (beta 0,
    NaN, negative var), however many batches are folded in."""
    for _ in range(steps):
        stats = BatchStats()
        for g, stopped in trajectories:
            stats.add_trajectory(g, stopped)
        before = state
        state = update_state(state, stats, p)  # raises ParameterError if the result were invalid
        assert math.isfinite(state.mu) and math.isfinite(state.var) and state.var >= 0
        assert state.beta > 0 and math.isfinite(state.beta)
        if before.armed and stats.trajectories and stats.tokens:
            assert p.beta_min <= state.beta <= p.beta_max


def test_regret_is_finite_for_a_zero_probability_token():
    assert regret(-math.inf, 0.0) == REGRET_CAP and regret(math.nan, 0.0) == REGRET_CAP
    assert regret(-5.0, -1.0) == 4.0
