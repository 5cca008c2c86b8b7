"""Critic clients: V(s) of token prefixes, from an in-process vLLM pooling engine or over HTTP.

Three ways to reach a critic, one interface (`CriticClient.values`):
  - `InProcessCritic`: a vLLM AsyncLLM with `runner="pooling"` in this process (the embedded default);
  - `EspoValuesCritic`: our own critic server, `POST /v1/values` (`espo-server critic`);
  - `VllmPoolingCritic`: a plain `vllm serve CRITIC --runner pooling`, `POST /pooling`.
The critic is a `LlamaForTokenClassification`-style model with one regression output; V of a prefix
is its output at the prefix's last token. Failures raise `CriticError`; the rollout loop decides
what that means (config `critic_fallback`), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import httpx

from . import metrics
from .engine import running_async_llm
from .errors import ServiceError

log = logging.getLogger(__name__)


class CriticError(ServiceError):
    """The critic did not answer in time or answered nonsense."""

    type = "critic_unavailable"


class CriticClient(Protocol):
    name: str

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        """V(s) of each prefix (prompt + response[:t])."""
        ...

    async def check(self) -> None:
        """Raise CriticError if the critic cannot answer now."""
        ...


async def timed_values(
    critic: CriticClient, prefixes: Sequence[Sequence[int]], timeout_s: float
) -> list[float]:
    """One critic query with a timeout, counted in metrics; raises CriticError on any failure."""
    started = time.perf_counter()
    try:
        values = await asyncio.wait_for(critic.values(prefixes), timeout_s)
        if len(values) != len(prefixes):
            raise CriticError(f"critic returned {len(values)} values for {len(prefixes)} prefixes")
    except asyncio.TimeoutError as exc:
        metrics.CRITIC_CALLS.labels(outcome="timeout").inc()
        raise CriticError(f"critic timed out after {timeout_s}s") from exc
    except asyncio.CancelledError:  # the sample ended meanwhile (aborted): asked, counted, never used
        metrics.CRITIC_CALLS.labels(outcome="cancelled").inc()
        raise
    except CriticError:
        metrics.CRITIC_CALLS.labels(outcome="error").inc()
        raise
    except Exception as exc:  # transport errors, engine errors: all mean "no value"
        metrics.CRITIC_CALLS.labels(outcome="error").inc()
        raise CriticError(f"critic failed: {exc!r}") from exc
    metrics.CRITIC_CALLS.labels(outcome="ok").inc()
    metrics.CRITIC_LATENCY.observe(time.perf_counter() - started)
    return values


class InProcessCritic:
    """A vLLM pooling engine in this process. vLLM batches concurrent queries itself."""

    name = "inprocess"

    def __init__(self, llm, model: str) -> None:
        self.llm = llm
        self.model = model
        self._ids = itertools.count()

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls,
        model: str,
        *,
        gpu_memory_utilization: float = 0.15,
        max_model_len: int | None = None,
        dtype: str = "auto",
    ) -> AsyncIterator[InProcessCritic]:
        from vllm.engine.arg_utils import AsyncEngineArgs

        args = AsyncEngineArgs(
            model=model,
            runner="pooling",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            # Per-token pooling needs every position's hidden state, so cached prefixes cannot help.
            enable_prefix_caching=False,
        )
        async with running_async_llm(args, "critic") as llm:
            yield cls(llm, model)

    async def _one(self, prefix: Sequence[int]) -> float:
        from vllm.pooling_params import PoolingParams

        params = PoolingParams(task="token_classify", use_activation=False)
        request_id = f"critic-{next(self._ids)}"
        out = None
        async for final in self.llm.encode({"prompt_token_ids": list(prefix)}, params, request_id):
            out = final
        if out is None:
            raise CriticError("critic engine returned nothing")
        return float(out.outputs.data[-1].reshape(-1)[0])

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        return list(await asyncio.gather(*(self._one(p) for p in prefixes)))

    async def check(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise CriticError(f"critic engine unhealthy: {exc!r}") from exc


class _HttpCritic:
    """Shared HTTP plumbing of the remote critics: one pooled httpx client, errors as CriticError."""

    name: str

    def __init__(
        self, base_url: str, *, timeout_s: float = 5.0, client: httpx.AsyncClient | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def _post(self, path: str, body: dict) -> dict:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise CriticError(
                f"critic at {self.base_url}{path} answered {response.status_code}: {response.text[:200]}"
            )
        return response.json()

    async def check(self) -> None:
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise CriticError(f"critic at {self.base_url} not healthy: {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()


class EspoValuesCritic(_HttpCritic):
    """Our critic protocol: `POST /v1/values {"token_ids": [[...]]}` -> `{"values": [...]}`."""

    name = "remote"

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        body = await self._post("/v1/values", {"token_ids": [list(p) for p in prefixes]})
        try:
            return [float(v) for v in body["values"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CriticError(f"malformed /v1/values answer: {str(body)[:200]}") from exc


class VllmPoolingCritic(_HttpCritic):
    """vLLM's `POST /pooling` with `task=token_classify`: per-token outputs, we take the last."""

    name = "vllm-pooling"

    def __init__(self, base_url: str, *, model: str | None = None, **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self.model = model

    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        body: dict = {"input": [list(p) for p in prefixes], "task": "token_classify", "use_activation": False}
        if self.model:
            body["model"] = self.model
        answer = await self._post("/pooling", body)
        try:
            rows = sorted(answer["data"], key=lambda d: d["index"])
            return [_last_value(row["data"]) for row in rows]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CriticError(f"malformed /pooling answer: {str(answer)[:200]}") from exc


def _last_value(data) -> float:
    """Per-token output [[v], [v], ...] or [v, v, ...] -> the last position's value."""
    last = data[-1]
    return float(last[0] if isinstance(last, list) else last)
