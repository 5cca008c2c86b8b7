"""The critic as the service sees it: V(s) of token prefixes, in batches, and its weight pushes.

One interface (`CriticClient.score`: a batch of prefixes in one call), three ways to reach a critic:
  - `critic_engine.InProcessCritic`: a vLLM AsyncLLM with `runner="pooling"` in this process (the
    embedded default);
  - `critic_http.EspoValuesCritic`: our own critic server, `POST /v1/values` (`espo-server critic`);
  - `critic_http.VllmPoolingCritic`: a plain `vllm serve CRITIC --runner pooling`, `POST /pooling`.
The critic is a `LlamaForTokenClassification`-style model with one regression output; V of a prefix
is its output at the prefix's last token. Failures raise `CriticError`; the rollout loop decides
what that means (config `critic_fallback`), never silently. Every query of every sample goes
through one `critic_batcher.CriticBatcher`.

Weights: the critic follows the learner (`load_weights`, through `push_weights`, which counts it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from . import metrics
from .errors import InvalidRequest, ServiceError


class CriticError(ServiceError):
    """The critic did not answer in time or answered nonsense."""

    type = "critic_unavailable"


@dataclass(frozen=True)
class CriticAnswer:
    """One critic call's answer for a batch of prefixes."""

    values: list[float]
    computed_tokens: list[int]
    """Tokens the critic computed for each prefix (the whole prefix where the critic does not say)."""
    version: int | None
    """Version of the weights that computed the values (None: the critic reports none)."""


class CriticClient(Protocol):
    name: str
    version: int | None
    """Version of the critic weights serving, as far as this client knows."""

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        """V(s) of each prefix (prompt + response[:t]), in one critic call."""
        ...

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        """`score(prefixes).values`."""
        ...

    async def check(self) -> None:
        """Raise CriticError if the critic cannot answer now."""
        ...

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        """Serve the critic weights in `path` as `version` (default: current + 1); return the
        version and the seconds it took. InvalidRequest if the directory does not fit (the old
        weights keep serving), CriticError if the critic failed."""
        ...


async def score_with(client: CriticClient, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
    """`client.score`, or for a client that only has `values` (a test double), its values counted as
    whole prefixes."""
    if hasattr(client, "score"):
        return await client.score(prefixes)
    values = await client.values(prefixes)
    return CriticAnswer(list(values), [len(p) for p in prefixes], getattr(client, "version", None))


async def push_weights(critic: CriticClient, path: str, version: int | None) -> tuple[int, float]:
    """`critic.load_weights`, counted (`counted_critic_load`)."""
    return await counted_critic_load(critic.load_weights(path, version))


async def counted_critic_load(load: Awaitable[tuple[int, float]]) -> tuple[int, float]:
    """A critic load (version, seconds), counted in `espo_critic_weight_loads_total{outcome}` (ok,
    rejected: the checkpoint did not fit and nothing changed, error: the critic failed) and
    `espo_critic_version`."""
    try:
        new_version, seconds = await load
    except InvalidRequest:
        metrics.CRITIC_WEIGHT_LOADS.labels(outcome="rejected").inc()
        raise
    except Exception:
        metrics.CRITIC_WEIGHT_LOADS.labels(outcome="error").inc()
        raise
    metrics.CRITIC_WEIGHT_LOADS.labels(outcome="ok").inc()
    metrics.CRITIC_VERSION.set(new_version)
    return new_version, seconds


class ValuesFromScore:
    """`values` of a critic client that has `score`."""

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        return (await self.score(prefixes)).values  # type: ignore[attr-defined]
