"""The ESPO stop rule and its ablations: pure maths, no I/O, no vLLM.

This is the one implementation, used by the server for every sampled token and by learners that own
the ESPO state. Symbols follow the paper's Algorithm 1 (see docs/algorithm.md):

    g_t  = max_a log pi(a|s_t) - log pi(a_t|s_t)              surrogate regret, >= 0
    gn_t = clip((g_t - mu) / sqrt(var + delta), -c, c)         normalised regret
    z_t  = alpha_s * z_{t-1} + gn_t,  z_{-1} = 0               smoothed cumulative regret
    stop at the first t with  warm  and  t >= min_tokens  and  z_t > beta * max(V(s_t), eps)

With `cumulative=False` the new term is weighted, z_t = alpha_s * z_{t-1} + (1 - alpha_s) * gn_t
(an average): exactly (1 - alpha_s) times the sum above, so the same rule needs beta (beta0,
eta_beta, beta_min, beta_max) multiplied by (1 - alpha_s) (docs/algorithm.md, "Two readings of the
smoothing").

The state (mu, var, beta, warm) is frozen inside a batch and updated at batch boundaries only:

    mu   <- a_ema * mu  + (1 - a_ema) * mean(g over the batch)
    var  <- a_ema * var + (1 - a_ema) * Var(g over the batch)
    beta <- clip(beta + eta_beta * (stop_rate - tau), beta_min, beta_max)

The first batch initialises mu and var and never stops anything. log-probabilities are the *raw*
ones (before temperature or penalties), so g measures the policy, not the sampler settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum

import numpy as np

__all__ = [
    "BatchStats",
    "Decision",
    "EspoParams",
    "EspoState",
    "EspoTracker",
    "NoStopTracker",
    "ParameterError",
    "RandomTracker",
    "RegretOnlyTracker",
    "StopRule",
    "TrajectoryTracker",
    "ValueOnlyTracker",
    "draw_random_stop",
    "make_tracker",
    "normalise",
    "regret",
    "smooth",
    "smoothed_regret",
    "threshold",
    "tokens_saved",
    "update_state",
]


class ParameterError(ValueError):
    """A parameter or state value outside its valid range. `field` names the first offending field
    (transports use it to point at the field: the server answers 400 with `param` set to it)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.field = problems[0][0]
        self.problems = list(problems)


class StopRule(str, Enum):
    """Which stop rule a request runs (the paper's method and its ablations)."""

    NONE = "none"
    """Plain PPO: nothing is ever stopped."""
    ESPO = "espo"
    """The full rule: smoothed regret against a value-scaled threshold."""
    RANDOM = "random"
    """Stops a fraction `random_rate` of trajectories at a uniformly drawn step (matched-rate ablation)."""
    REGRET_ONLY = "regret_only"
    """ESPO with V(s_t) replaced by the constant `v_const`: no critic."""
    VALUE_ONLY = "value_only"
    """Critic queried every `critic_stride` tokens; stop when V(s_t) < `v_min`."""

    @property
    def steers_beta(self) -> bool:
        """Whether the rule's stop rate feeds the beta controller (the rules that use beta)."""
        return self in (StopRule.ESPO, StopRule.REGRET_ONLY)

    @property
    def needs_critic(self) -> bool:
        """Whether the rule asks the critic for V(s_t)."""
        return self in (StopRule.ESPO, StopRule.VALUE_ONLY)


@dataclass(frozen=True)
class EspoParams:
    """Hyper-parameters of the rule. Defaults marked (paper) are the reported ones; the others are
    not reported in the paper and are this project's choices (docs/algorithm.md says why)."""

    a_ema: float = 0.99
    """a_ema (paper 0.99): EMA weight of the old mu/var at each batch boundary."""
    alpha_s: float = 0.9
    """alpha_s (paper 0.9): smoothing of the normalised regret, z_t = alpha_s*z_{t-1} + gn_t."""
    cumulative: bool = True
    """The smoothed cumulative regret z_t = alpha_s*z_{t-1} + gn_t, the scale beta0 and eta_beta are
    read on; False: the average alpha_s*z_{t-1} + (1-alpha_s)*gn_t, (1-alpha_s) times it, so beta0,
    eta_beta, beta_min and beta_max must be (1-alpha_s) times as large to give the same rule."""
    beta0: float = 7.0
    """beta_0 (paper 7.0): the threshold scale a fresh state starts from."""
    eta_beta: float = 0.1
    """eta_beta (paper 0.1): step of the beta controller."""
    tau: float = 0.25
    """tau (paper 0.25): target stop rate of the beta controller."""
    eps: float = 0.2
    """eps (paper 0.2): floor on V(s_t) in the threshold, so beta*eps is the lowest threshold."""
    r_fail: float = -1.0
    """r_fail (paper -1): reward placed on the last kept token of a stopped trajectory."""
    clip_c: float = 5.0
    """c (ours): normalised regret is clipped to [-c, c] so one wild token cannot trigger a stop."""
    delta: float = 1e-6
    """delta (ours): added to var before the square root."""
    beta_min: float = 0.5
    """beta_min (ours): lower clip of the beta controller (threshold beta_min*eps = 0.1 stops at
    almost any positive z, so the controller can always reach a beta that stops tau of a batch)."""
    beta_max: float = 500.0
    """beta_max (ours): upper clip of the beta controller (beta_max*eps = 100 is above the largest
    cumulative z, c/(1-alpha_s) = 50, so at the clip nothing stops even if the critic says 0)."""
    min_tokens: int = 8
    """(ours) no stop before response token index min_tokens."""
    critic_stride: int = 8
    """(ours) at most one critic query per trajectory every critic_stride tokens."""
    warm_after_batches: int | None = None
    """(ours) the state turns warm by itself after this many batches; None: only the learner sets it."""
    random_rate: float = 0.25
    """`random` rule: fraction of trajectories stopped (set it to the espo stop rate to match it)."""
    v_const: float = 0.0
    """`regret_only` rule: the constant standing in for V(s_t); threshold beta*max(v_const, eps)."""
    v_min: float = 0.1
    """`value_only` rule: stop when the critic's V(s_t) is below this."""

    def __post_init__(self) -> None:
        # Every combination that passes keeps `update_state`'s result a valid EspoState: beta stays in
        # [beta_min, beta_max] with beta_min > 0, and mu, var stay finite.
        problems: list[tuple[str, str]] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append((f.name, f"{f.name} must be finite, got {value}"))
        for name in ("a_ema", "alpha_s", "tau", "random_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append((name, f"{name} must be in [0, 1], got {value}"))
        for name in ("eps", "eta_beta"):
            if getattr(self, name) < 0:
                problems.append((name, f"{name} must be >= 0, got {getattr(self, name)}"))
        for name in ("delta", "clip_c", "beta_min", "beta0"):
            if not getattr(self, name) > 0:
                problems.append((name, f"{name} must be > 0, got {getattr(self, name)}"))
        if self.beta_max < self.beta_min:
            problems.append(("beta_max", f"beta_max ({self.beta_max}) must be >= beta_min ({self.beta_min})"))
        if self.min_tokens < 0:
            problems.append(("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"))
        if self.critic_stride < 1:
            problems.append(("critic_stride", f"critic_stride must be >= 1, got {self.critic_stride}"))
        if self.warm_after_batches is not None and self.warm_after_batches < 0:
            problems.append(
                ("warm_after_batches", f"warm_after_batches must be >= 0, got {self.warm_after_batches}")
            )
        if problems:
            raise ParameterError(problems)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_overrides(self, overrides: dict[str, object] | None) -> EspoParams:
        """A copy with some fields replaced; unknown names raise KeyError naming them."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise KeyError(f"unknown stop-rule parameter(s): {', '.join(unknown)}")
        return replace(self, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EspoState:
    """The rule's state between batches: (mu, var, beta, warm), plus bookkeeping.

    The one type of the state: the wire protocol uses this dataclass as it is (pydantic validates and
    documents a stdlib dataclass from `__pydantic_config__` and the field docstrings), so the server
    and learners never convert between a "wire" and a "maths" state.
    """

    __pydantic_config__ = {"extra": "forbid", "use_attribute_docstrings": True, "allow_inf_nan": False}  # noqa: RUF012

    mu: float = 0.0
    """mu: running mean of the regret g."""
    var: float = 1.0
    """var: running variance of the regret g."""
    beta: float = 7.0
    """beta: threshold scale, moved by the stop-rate controller."""
    warm: bool = False
    """Stopping is enabled only when warm (the critic is trusted)."""
    initialised: bool = False
    """False until the first batch has set mu and var; an uninitialised state never stops."""
    batches: int = 0
    """Number of batches folded into this state."""

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        for name in ("mu", "var", "beta"):
            if not math.isfinite(getattr(self, name)):
                problems.append((name, f"{name} must be finite, got {getattr(self, name)}"))
        if self.var < 0:
            problems.append(("var", f"var must be >= 0, got {self.var}"))
        if not self.beta > 0:
            problems.append(("beta", f"beta must be > 0, got {self.beta}"))
        if self.batches < 0:
            problems.append(("batches", f"batches must be >= 0, got {self.batches}"))
        if problems:
            raise ParameterError(problems)

    @classmethod
    def fresh(cls, params: EspoParams) -> EspoState:
        return cls(beta=params.beta0)

    @property
    def armed(self) -> bool:
        """Whether the regret-based rules may stop with this state."""
        return self.warm and self.initialised


# ---------------------------------------------------------------------------------------------
# Per-token formulas
# ---------------------------------------------------------------------------------------------


REGRET_CAP = 1000.0
"""g is capped here: a token sampled with (numerically) zero probability has g = inf, which would
make the batch statistics infinite; 1000 nats is far beyond any real regret and still finite."""


def regret(sampled_logprob: float, top_logprob: float) -> float:
    """g_t = max_a log pi(a|s_t) - log pi(a_t|s_t); clamped to [0, REGRET_CAP] (rounding; zero
    probability)."""
    g = top_logprob - sampled_logprob
    return min(REGRET_CAP, max(0.0, g)) if g == g else REGRET_CAP


def normalise(g: float, mu: float, var: float, delta: float, clip_c: float) -> float:
    """gn_t = clip((g_t - mu) / sqrt(var + delta), -c, c)."""
    x = (g - mu) / math.sqrt(var + delta)
    return min(clip_c, max(-clip_c, x))


def smooth(z_prev: float, gn: float, alpha_s: float, cumulative: bool = True) -> float:
    """z_t = alpha_s * z_{t-1} + gn_t; not `cumulative`: alpha_s * z_{t-1} + (1 - alpha_s) * gn_t."""
    return alpha_s * z_prev + (gn if cumulative else (1.0 - alpha_s) * gn)


def threshold(beta: float, value: float, eps: float) -> float:
    """The stop threshold beta * max(V(s_t), eps)."""
    return beta * max(value, eps)


def smoothed_regret(g: Sequence[float], state: EspoState, params: EspoParams) -> np.ndarray:
    """z_0..z_{T-1} for a whole regret sequence (reference loop; used by tests and learners)."""
    z = np.zeros(len(g), dtype=np.float64)
    z_prev = 0.0
    for t, g_t in enumerate(g):
        gn_t = normalise(g_t, state.mu, state.var, params.delta, params.clip_c)
        z_prev = smooth(z_prev, gn_t, params.alpha_s, params.cumulative)
        z[t] = z_prev
    return z


# ---------------------------------------------------------------------------------------------
# Per-trajectory trackers: feed tokens one at a time, get decisions back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the rule says after token t: stop now, or ask the critic for V(s_t) and then `resolve`."""

    stop: bool = False
    query_value: bool = False


_CONTINUE = Decision()
_STOP = Decision(stop=True)
_QUERY = Decision(query_value=True)


@dataclass
class TrajectoryTracker:
    """Shared per-trajectory bookkeeping: regret and smoothed regret of every token so far.

    Subclasses decide. Callers feed `step(sampled_logprob, top_logprob)` for t = 0, 1, ...; when it
    returns `query_value`, they fetch V(s_t) (state = prompt + response[:t]) and call
    `resolve(t, value)`; `value=None` means the critic failed, and `critic_fallback` says what then:
    "no_stop" (never stop on that query) or "regret_only" (decide with `v_const` instead of V).
    A tracker decides at most once; after that it only records g and z.
    """

    state: EspoState
    params: EspoParams
    critic_fallback: str = "no_stop"
    g: list[float] = field(default_factory=list)
    z: list[float] = field(default_factory=list)
    values: dict[int, float | None] = field(default_factory=dict)
    stop_step: int | None = None
    pending: int | None = None
    last_query: int | None = None
    earlier_states: list[tuple[int, EspoState]] = field(default_factory=list)
    """(end, state) of each state this tracker judged with before `rebase`: steps before `end`
    were judged with `state`. Empty unless the trajectory outlived a batch (a carried-over sample)."""

    @property
    def t(self) -> int:
        """Index of the last token fed."""
        return len(self.g) - 1

    def rebase(self, state: EspoState) -> None:
        """Judge the tokens from the next one on with `state` (the frozen state of a new batch)."""
        self.earlier_states.append((len(self.g), self.state))
        self.state = state

    def state_at(self, t: int) -> EspoState:
        """The state step t was judged with."""
        for end, state in self.earlier_states:
            if t < end:
                return state
        return self.state

    def step(self, sampled_logprob: float, top_logprob: float) -> Decision:
        g_t = regret(sampled_logprob, top_logprob)
        self.g.append(g_t)
        z_prev = self.z[-1] if self.z else 0.0
        gn_t = normalise(g_t, self.state.mu, self.state.var, self.params.delta, self.params.clip_c)
        self.z.append(smooth(z_prev, gn_t, self.params.alpha_s, self.params.cumulative))
        if self.stop_step is not None:
            return _CONTINUE
        decision = self._decide(self.t)
        if decision.stop:
            self.stop_step = self.t
        elif decision.query_value:
            self.pending = self.last_query = self.t
        return decision

    def resolve(self, t: int, value: float | None) -> bool:
        """Fold in V(s_t) for a query made at step t; True means stop at t."""
        if self.pending != t:
            raise ValueError(f"no critic query pending for step {t}")
        self.pending = None
        self.values[t] = value
        if self.stop_step is not None:
            return False
        if value is None:
            stop = self.critic_fallback == "regret_only" and self._regret_only_stop(t)
        else:
            stop = self._stop_with_value(t, value)
        if stop:
            self.stop_step = t
        return stop

    def _may_query(self, t: int) -> bool:
        """The critic schedule every rule that asks for V shares: never with a query pending, and at
        most one query per `critic_stride` tokens."""
        if self.pending is not None:
            return False
        return self.last_query is None or t - self.last_query >= self.params.critic_stride

    def _regret_only_stop(self, t: int) -> bool:
        """What `regret_only` decides at t (also the `regret_only` critic fallback of other rules)."""
        p, s = self.params, self.state_at(t)
        return s.armed and t >= p.min_tokens and self.z[t] > threshold(s.beta, p.v_const, p.eps)

    def _decide(self, t: int) -> Decision:
        return _CONTINUE

    def _stop_with_value(self, t: int, value: float) -> bool:
        return False


class NoStopTracker(TrajectoryTracker):
    """Rule `none`: records g and z (for traces and batch statistics), never stops."""


class EspoTracker(TrajectoryTracker):
    """Rule `espo`. V(s_t) is needed only when z_t > beta*eps (the lowest possible threshold), so
    the critic is asked lazily, at most every `critic_stride` tokens."""

    def _decide(self, t: int) -> Decision:
        p, s = self.params, self.state
        if not s.armed or t < p.min_tokens:
            return _CONTINUE
        if self.z[t] > threshold(s.beta, 0.0, p.eps) and self._may_query(t):
            return _QUERY
        return _CONTINUE

    def _stop_with_value(self, t: int, value: float) -> bool:
        return self.z[t] > threshold(self.state_at(t).beta, value, self.params.eps)


class RegretOnlyTracker(TrajectoryTracker):
    """Rule `regret_only`: z_t > beta * max(v_const, eps), no critic."""

    def _decide(self, t: int) -> Decision:
        return _STOP if self._regret_only_stop(t) else _CONTINUE


class ValueOnlyTracker(TrajectoryTracker):
    """Rule `value_only`: V(s_t) from min_tokens on, on espo's critic schedule (`_may_query`: at most
    every `critic_stride` tokens, none while one is pending); stop if V < v_min."""

    def _decide(self, t: int) -> Decision:
        if not self.state.warm or t < self.params.min_tokens:
            return _CONTINUE
        return _QUERY if self._may_query(t) else _CONTINUE

    def _stop_with_value(self, t: int, value: float) -> bool:
        return value < self.params.v_min


@dataclass
class RandomTracker(TrajectoryTracker):
    """Rule `random`: stops at a step drawn in advance by `draw_random_stop` (None: never)."""

    stop_at: int | None = None

    def _decide(self, t: int) -> Decision:
        return _STOP if self.state.warm and t == self.stop_at else _CONTINUE


def draw_random_stop(rng: np.random.Generator, params: EspoParams, max_tokens: int) -> int | None:
    """With probability random_rate, a step drawn uniformly from [min_tokens, max_tokens - 1]."""
    if max_tokens <= params.min_tokens or rng.random() >= params.random_rate:
        return None
    return int(rng.integers(params.min_tokens, max_tokens))


def make_tracker(
    rule: StopRule | str,
    state: EspoState,
    params: EspoParams,
    *,
    critic_fallback: str = "no_stop",
    random_stop_at: int | None = None,
) -> TrajectoryTracker:
    rule = StopRule(rule)
    if rule is StopRule.RANDOM:
        return RandomTracker(state, params, critic_fallback, stop_at=random_stop_at)
    cls = {
        StopRule.NONE: NoStopTracker,
        StopRule.ESPO: EspoTracker,
        StopRule.REGRET_ONLY: RegretOnlyTracker,
        StopRule.VALUE_ONLY: ValueOnlyTracker,
    }[rule]
    return cls(state, params, critic_fallback)


# ---------------------------------------------------------------------------------------------
# Batch boundaries
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    """What one batch contributes to the state update: regret moments and the stop rate.

    Sums, not means, so that several calls of one batch (same batch_id) merge exactly.
    """

    tokens: int = 0
    """Number of regret values g folded in."""
    g_sum: float = 0.0
    g_sumsq: float = 0.0
    trajectories: int = 0
    stops: int = 0
    """Trajectories the rule stopped (or would have stopped, in shadow mode)."""

    def add_trajectory(self, g: Iterable[float], stopped: bool | None) -> None:
        """Fold in one trajectory's regrets; `stopped=None` for rules that do not steer beta (their
        trajectories count toward mu/var but not toward the stop rate)."""
        arr = np.asarray(list(g), dtype=np.float64)
        self.tokens += int(arr.size)
        self.g_sum += float(arr.sum())
        self.g_sumsq += float((arr * arr).sum())
        if stopped is not None:
            self.trajectories += 1
            self.stops += int(stopped)

    def merge(self, other: BatchStats) -> BatchStats:
        return BatchStats(
            self.tokens + other.tokens,
            self.g_sum + other.g_sum,
            self.g_sumsq + other.g_sumsq,
            self.trajectories + other.trajectories,
            self.stops + other.stops,
        )

    @property
    def g_mean(self) -> float:
        return self.g_sum / self.tokens if self.tokens else 0.0

    @property
    def g_var(self) -> float:
        """Population variance of g over the batch."""
        if not self.tokens:
            return 0.0
        return max(0.0, self.g_sumsq / self.tokens - self.g_mean**2)

    @property
    def stop_rate(self) -> float:
        return self.stops / self.trajectories if self.trajectories else 0.0


def update_state(state: EspoState, stats: BatchStats, params: EspoParams) -> EspoState:
    """The batch-boundary update of (mu, var, beta, warm).

    - An empty batch (no tokens) changes nothing.
    - The first batch sets mu and var to the batch's own moments.
    - beta moves only after a batch in which the state was armed (warm and initialised): a cold
      batch stops nothing, and its zero stop rate must not drag beta down.
    - warm turns on by itself once `warm_after_batches` batches have been folded in (if set).
    """
    if stats.tokens == 0:
        return state
    if state.initialised:
        mu = params.a_ema * state.mu + (1 - params.a_ema) * stats.g_mean
        var = params.a_ema * state.var + (1 - params.a_ema) * stats.g_var
    else:
        mu, var = stats.g_mean, stats.g_var
    beta = state.beta
    if state.armed and stats.trajectories:
        beta = beta + params.eta_beta * (stats.stop_rate - params.tau)
        beta = min(params.beta_max, max(params.beta_min, beta))
    batches = state.batches + 1
    warm = state.warm or (params.warm_after_batches is not None and batches >= params.warm_after_batches)
    return EspoState(mu=mu, var=var, beta=beta, warm=warm, initialised=True, batches=batches)


def tokens_saved(
    stop_steps: Sequence[int], unstopped_lengths: Sequence[int], max_tokens: int
) -> tuple[int, int]:
    """(estimate, upper bound) of the tokens that stopping saved in one call.

    estimate:    sum over stopped trajectories of max(0, L - (stop_step + 1)), with L the mean length
                 of the call's trajectories that were not stopped (max_tokens if none were);
    upper bound: sum of max_tokens - (stop_step + 1).
    """
    mean_len = float(np.mean(unstopped_lengths)) if len(unstopped_lengths) else float(max_tokens)
    estimate = sum(max(0.0, mean_len - (s + 1)) for s in stop_steps)
    upper = sum(max(0, max_tokens - (s + 1)) for s in stop_steps)
    return round(estimate), upper
