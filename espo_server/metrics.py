"""Prometheus series of the service (`espo_*`), in prometheus_client's default registry.

One meaning per series: a label only splits one quantity into parts that add up (outcomes, end
reasons, rules), so `sum()` over it is a total; figures that do not add up (an estimate and a bound
of the tokens saved, the fields of the ESPO state) are series of their own.

vLLM registers its own `vllm:*` series in the same registry when stats logging is on, so
`GET /metrics` serves both. Metrics are module-level: they exist once per process, however many
apps a test builds.

Several engines in one process (the policy and the in-process critic): each vLLM engine's
`PrometheusStatLogger` starts by unregistering every `vllm:*` collector in the default registry
(`vllm.v1.metrics.prometheus.unregister_vllm_metrics`, called from its `__init__`) and registers
its own under the same names. The engine started first keeps counting into collectors nobody
exports, so only the last engine's series would show. `ENGINE_SERIES` fixes that: right after an
engine is built, `adopt(role)` moves the collectors it registered out of the default registry and
into this one collector, which exports every adopted engine's series with an `espo_engine` label
(`policy`, `critic`) under one metric family per name.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from espo_client.stop_rule import EspoState

TRAJECTORIES = Counter(
    "espo_trajectories_total", "Trajectories returned, by end reason and stop rule", ["end_reason", "rule"]
)
GENERATED_TOKENS = Counter("espo_generated_tokens_total", "Response tokens returned to callers", ["rule"])
DISCARDED_TOKENS = Counter(
    "espo_discarded_tokens_total", "Tokens generated past a stop step while the critic answered, discarded"
)
ENGINE_TOKENS = Counter(
    "espo_engine_tokens_total", "Tokens the engine generated (kept + discarded past stops)", ["rule"]
)
STOPPED = Counter("espo_stopped_trajectories_total", "Trajectories ended by the stop rule", ["rule"])
SHADOW_STOPPED = Counter(
    "espo_shadow_stops_total", "Trajectories the rule would have stopped in shadow mode", ["rule"]
)
# One counter per figure: an estimate, a bound and an exact count of tokens saved do not add up.
TOKENS_SAVED_ESTIMATE = Counter(
    "espo_tokens_saved_estimate_total",
    "Tokens saved by stops, estimated: a stopped trajectory would have run as long as the call's "
    "unstopped mean (usage.tokens_saved_estimate)",
)
TOKENS_SAVED_UPPER_BOUND = Counter(
    "espo_tokens_saved_upper_bound_total",
    "Tokens saved by stops, upper bound: a stopped trajectory would have run to max_tokens "
    "(usage.tokens_saved_upper_bound)",
)
TOKENS_SAVED_SHADOW = Counter(
    "espo_tokens_saved_shadow_total",
    "Tokens the rule would have saved in shadow mode, exact: each trajectory's full length past its "
    "would-be stop (usage.tokens_saved_shadow)",
)
CRITIC_CALLS = Counter("espo_critic_calls_total", "Critic value queries", ["outcome"])
CRITIC_LATENCY = Histogram(
    "espo_critic_latency_seconds",
    "Latency of one critic query",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CRITIC_TOKENS = Counter(
    "espo_critic_tokens_total", "Tokens the critic computed for answered queries (prefix-cache hits excluded)"
)
CRITIC_PREFIX_TOKENS = Counter(
    "espo_critic_prefix_tokens_total",
    "Summed length of the prefixes the critic was asked about (what re-encoding each whole would cost)",
)
CRITIC_BATCH_SIZE = Histogram(
    "espo_critic_batch_size",
    "Queries gathered into one critic call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CRITIC_VERSION = Gauge("espo_critic_version", "Version of the critic weights serving (-1: unknown)")
CRITIC_WEIGHT_LOADS = Counter("espo_critic_weight_loads_total", "Critic weight pushes", ["outcome"])
REQUESTS = Counter(
    "espo_rollout_requests_total",
    "Rollout calls that ran, by how they ended (ok, error, cancelled); each is counted once, when it "
    "ends (replays of a known request_id and calls refused before they ran are not counted)",
    ["outcome"],
)
for _outcome in ("ok", "error", "cancelled"):  # every outcome exported from the start: sum() adds up
    REQUESTS.labels(outcome=_outcome)
REQUEST_LATENCY = Histogram(
    "espo_rollout_request_seconds",
    "Wall time of one rollout call",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
INFLIGHT = Gauge("espo_inflight_trajectories", "Trajectories being generated now")
POLICY_VERSION = Gauge("espo_policy_version", "Version of the weights being served")
WEIGHT_LOADS = Counter("espo_weight_loads_total", "Weight reloads", ["outcome"])
WEIGHT_PUSH_SECONDS = Histogram(
    "espo_weight_push_seconds",
    "Wall time of a weight push that succeeded, from its arrival to the new weights serving: the "
    "checks, the wait for the work in flight (running calls, critic queries), the reload "
    "(model: policy|critic; source: path)",
    ["model", "source"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
# The server-owned ESPO state (espo_client.stop_rule.EspoState), one gauge per field.
STATE_MU = Gauge("espo_state_mu", "ESPO state mu: running mean of the regret g")
STATE_VAR = Gauge("espo_state_var", "ESPO state var: running variance of the regret g")
STATE_BETA = Gauge("espo_state_beta", "ESPO state beta: threshold scale, moved by the stop-rate controller")
STATE_WARM = Gauge("espo_state_warm", "ESPO state warm: 1 when stopping is enabled (the critic is trusted)")
STATE_INITIALISED = Gauge("espo_state_initialised", "ESPO state initialised: 1 once a batch set mu and var")
STATE_BATCHES = Gauge("espo_state_batches", "ESPO state batches: number of batches folded into the state")


def set_state_gauges(state: EspoState) -> None:
    STATE_MU.set(state.mu)
    STATE_VAR.set(state.var)
    STATE_BETA.set(state.beta)
    STATE_WARM.set(float(state.warm))
    STATE_INITIALISED.set(float(state.initialised))
    STATE_BATCHES.set(state.batches)


P = ParamSpec("P")
R = TypeVar("R")


def timed_push(model: str, source: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Observe each successful call of the decorated weight push in `espo_weight_push_seconds`."""

    def decorate(push: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        WEIGHT_PUSH_SECONDS.labels(model=model, source=source)  # exported (count 0) before the first push

        @functools.wraps(push)
        async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = await push(*args, **kwargs)
            WEIGHT_PUSH_SECONDS.labels(model=model, source=source).observe(time.perf_counter() - started)
            return result

        return timed

    return decorate


ENGINE_LABEL = "espo_engine"
"""The label that tells the engines' `vllm:*` series apart: `policy` or `critic`."""


class EngineSeries:
    """The `vllm:*` series of every engine in this process, each labelled with its role."""

    def __init__(self) -> None:
        self._engines: dict[str, list] = {}

    def adopt(self, role: str, registry: CollectorRegistry = REGISTRY) -> int:
        """Take the `vllm:*` collectors now in `registry` (those of the engine just built) as `role`'s.
        Call it right after the engine is constructed, before another engine is. Returns how many."""
        collectors = [
            c for c in list(registry._collector_to_names) if str(getattr(c, "_name", "")).startswith("vllm:")
        ]
        for collector in collectors:
            registry.unregister(collector)
        self._engines[role] = collectors
        return len(collectors)

    def release(self, role: str) -> None:
        """Stop exporting `role`'s series (its engine shut down)."""
        self._engines.pop(role, None)

    def describe(self) -> list[Metric]:
        return []  # names are not reserved: the families depend on which engines are running

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for role, collectors in list(self._engines.items()):
            for collector in collectors:
                for family in collector.collect():
                    merged = families.get(family.name)
                    if merged is None:
                        merged = Metric(family.name, family.documentation, family.type)
                        merged.unit = family.unit
                        families[family.name] = merged
                    for sample in family.samples:
                        labels = {**sample.labels, ENGINE_LABEL: role}
                        merged.add_sample(
                            sample.name, labels, sample.value, sample.timestamp, sample.exemplar
                        )
        yield from families.values()


ENGINE_SERIES = EngineSeries()
REGISTRY.register(ENGINE_SERIES)


def critic_process_registry() -> CollectorRegistry:
    """What `espo-server critic` serves on /metrics: its engine's `vllm:*` series (espo_engine="critic"),
    the critic's version, pushes and push durations, and the process's own (memory, CPU, GC); not the
    rollout server's `espo_*` series, which would be idle zeros there (a critic pod among the replicas)."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    registry = CollectorRegistry()
    for collector in (
        ENGINE_SERIES,
        CRITIC_VERSION,
        CRITIC_WEIGHT_LOADS,
        WEIGHT_PUSH_SECONDS,
        PROCESS_COLLECTOR,
        PLATFORM_COLLECTOR,
        GC_COLLECTOR,
    ):
        registry.register(collector)
    return registry
