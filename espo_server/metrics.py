"""Prometheus series of the service (`espo_*`), in prometheus_client's default registry.

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

from collections.abc import Iterator

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
STOPPED = Counter("espo_stopped_trajectories_total", "Trajectories ended by the stop rule", ["rule"])
SHADOW_STOPPED = Counter(
    "espo_shadow_stops_total", "Trajectories the rule would have stopped in shadow mode", ["rule"]
)
TOKENS_SAVED = Counter(
    "espo_tokens_saved_total",
    "Tokens saved by stopping: kind=estimate (mean unstopped length), upper_bound (max_tokens), "
    "shadow (exact, shadow mode)",
    ["kind"],
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
REQUESTS = Counter("espo_rollout_requests_total", "POST /v1/rollouts calls by outcome", ["outcome"])
REQUEST_LATENCY = Histogram(
    "espo_rollout_request_seconds",
    "Wall time of one rollout call",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
INFLIGHT = Gauge("espo_inflight_trajectories", "Trajectories being generated now")
POLICY_VERSION = Gauge("espo_policy_version", "Version of the weights being served")
STATE = Gauge("espo_state", "Server-owned ESPO state (field=mu|var|beta|warm|batches)", ["field"])
WEIGHT_LOADS = Counter("espo_weight_loads_total", "Weight reloads", ["outcome"])


def set_state_gauges(state: EspoState) -> None:
    for name, value in (
        ("mu", state.mu),
        ("var", state.var),
        ("beta", state.beta),
        ("warm", float(state.warm)),
        ("batches", state.batches),
    ):
        STATE.labels(field=name).set(value)


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
    the critic's version and pushes, and the process's own (memory, CPU, GC); not the rollout
    server's `espo_*` series, which would be idle zeros there (a critic pod among the replicas)."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    registry = CollectorRegistry()
    for collector in (
        ENGINE_SERIES,
        CRITIC_VERSION,
        CRITIC_WEIGHT_LOADS,
        PROCESS_COLLECTOR,
        PLATFORM_COLLECTOR,
        GC_COLLECTOR,
    ):
        registry.register(collector)
    return registry
