"""Critic clients: V(s) of token prefixes, from an in-process vLLM pooling engine or over HTTP.

Three ways to reach a critic, one interface (`CriticClient.score`: a batch of prefixes in one call):
  - `InProcessCritic`: a vLLM AsyncLLM with `runner="pooling"` in this process (the embedded default);
  - `EspoValuesCritic`: our own critic server, `POST /v1/values` (`espo-server critic`);
  - `VllmPoolingCritic`: a plain `vllm serve CRITIC --runner pooling`, `POST /pooling`.
The critic is a `LlamaForTokenClassification`-style model with one regression output; V of a prefix
is its output at the prefix's last token. Failures raise `CriticError`; the rollout loop decides
what that means (config `critic_fallback`), never silently.

Every query goes through a `CriticBatcher`: queries that arrive within a short window (up to a
bounded batch) become one critic call, which counts against one timeout; its answer says which
critic version computed the values and how many tokens the critic really computed.

Why that is cheap. vLLM's `classify` task pools the LAST token, so the engine may serve a prefix's
earlier tokens from its prefix cache: a query then computes only what no earlier query (of this
trajectory, or of another sample with the same prefix) has filled in, in whole KV blocks. The
`token_classify` task (per-token outputs) always recomputes the whole prefix: vLLM skips the prefix
cache for it. Measured on the tiny critic (CPU, 16 trajectories queried every 8 tokens up to 132
tokens, docs in README "Performance"): 0.32 of the prefix tokens computed with block size 32, 0.55
with 64, 1.0 without caching; values equal to HF's within 3e-7 either way. CPU's attention kernel
needs block sizes in multiples of 32 (vLLM's CPU default is 128); GPUs default to 16.

Weights: the critic follows the learner. `load_weights(path, version)` checks the directory against
the served critic's checkpoint (tensor names and shapes, config architecture), then reloads in
place, waiting for queries in flight, and resets the prefix cache (cached KV of the old weights
would give wrong values). A directory that does not fit is refused (`InvalidRequest`) and the old
critic goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from . import metrics
from .critic_worker import checkpoint_problem
from .engine import ReadWriteGate, running_async_llm
from .errors import Forbidden, InvalidRequest, ServiceError

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32
"""KV block size of the critic on CPU with prefix caching: the smallest the CPU attention kernel takes."""
PUSH_TIMEOUT_S = 600.0
"""How long a forwarded critic push may take (it waits for the critic's queries in flight)."""


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


# ---------------------------------------------------------------------------------------------
# Batching: every query of every sample goes through here
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticValue:
    """One query's answer."""

    value: float
    version: int | None
    computed_tokens: int
    batch_size: int


@dataclass
class _Query:
    prefix: list[int]
    future: asyncio.Future[CriticValue]
    asked: float = field(default_factory=time.perf_counter)


class CriticBatcher:
    """Gathers concurrent queries into one critic call: a batch is sent `window_s` after its first
    query arrived (0: once the event loop has run the tasks that are ready, i.e. the queries raised
    by the same engine step), or at once when it holds `max_batch` queries. A batch counts against
    one timeout, `timeout_s`, from when it is sent; if it fails or times out, every query it held
    raises CriticError. Batches run concurrently; a cancelled query leaves its batch alone.

    Counted here, per query: `espo_critic_calls_total{outcome=ok|error|timeout|cancelled}` (so that
    it sums to the responses' `critic_calls`; cancelled: asked, never used) and
    `espo_critic_latency_seconds` (from the ask to the answer); per batch: `espo_critic_batch_size`,
    and the tokens.
    """

    def __init__(
        self, client: CriticClient, *, timeout_s: float, window_s: float = 0.0, max_batch: int = 64
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.client = client
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.max_batch = max_batch
        self._pending: list[_Query] = []
        self._timer: asyncio.Handle | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.client.name

    async def value(self, prefix: Sequence[int]) -> CriticValue:
        """V of one prefix, batched with whatever else is asked meanwhile. Raises CriticError."""
        loop = asyncio.get_running_loop()
        query = _Query(list(prefix), loop.create_future())
        self._pending.append(query)
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            if self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        try:
            return await query.future
        except asyncio.CancelledError:
            if query.future.cancelled():  # the sample ended (aborted) before the answer came
                metrics.CRITIC_CALLS.labels(outcome="cancelled").inc()
            raise

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = [q for q in self._pending if not q.future.done()]
        self._pending = []
        for start in range(0, len(pending), self.max_batch):
            task = asyncio.create_task(self._send(pending[start : start + self.max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _send(self, batch: list[_Query]) -> None:
        metrics.CRITIC_BATCH_SIZE.observe(len(batch))
        error: CriticError | None = None
        outcome = "ok"
        try:
            answer = await asyncio.wait_for(
                score_with(self.client, [q.prefix for q in batch]), self.timeout_s
            )
            if len(answer.values) != len(batch) or len(answer.computed_tokens) != len(batch):
                raise CriticError(f"critic returned {len(answer.values)} values for {len(batch)} prefixes")
        except asyncio.TimeoutError:
            outcome = "timeout"
            error = CriticError(f"critic timed out after {self.timeout_s}s (a batch of {len(batch)} queries)")
        except CriticError as exc:
            outcome, error = "error", exc
        except Exception as exc:  # transport errors, engine errors: all mean "no value"
            outcome, error = "error", CriticError(f"critic failed: {exc!r}")
        now = time.perf_counter()
        cancelled = sum(q.future.cancelled() for q in batch)  # counted by `value` already
        metrics.CRITIC_CALLS.labels(outcome=outcome).inc(len(batch) - cancelled)
        if error is not None:
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(error)
                    q.future.exception()  # retrieved: a query cancelled meanwhile must not warn
            return
        metrics.CRITIC_TOKENS.inc(sum(answer.computed_tokens))
        metrics.CRITIC_PREFIX_TOKENS.inc(sum(len(q.prefix) for q in batch))
        for q, value, tokens in zip(batch, answer.values, answer.computed_tokens, strict=True):
            metrics.CRITIC_LATENCY.observe(now - q.asked)
            if not q.future.done():
                q.future.set_result(CriticValue(float(value), answer.version, int(tokens), len(batch)))

    async def aclose(self) -> None:
        """Cancel the batches in flight and the queries still waiting."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in self._pending:
            if not q.future.done():
                q.future.cancel()
        self._pending = []
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# The critics
# ---------------------------------------------------------------------------------------------


class _Values:
    async def values(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        return (await self.score(prefixes)).values  # type: ignore[attr-defined]


class InProcessCritic(_Values):
    """A vLLM pooling engine in this process (LAST pooling, prefix caching). vLLM batches the
    requests of one call into its engine steps; a weight load waits for the calls in flight."""

    name = "inprocess"

    def __init__(self, llm, model: str, *, prefix_caching: bool = True, version: int = 0) -> None:
        self.llm = llm
        self.model = model
        self.weights_dir = model
        """The directory of the weights serving now (the start-up model until a push)."""
        self.version: int | None = version
        self.prefix_caching = prefix_caching
        self.gate = ReadWriteGate()
        self._ids = itertools.count()
        cache = getattr(getattr(llm, "vllm_config", None), "cache_config", None)
        self.block_size: int | None = getattr(cache, "block_size", None)

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls,
        model: str,
        *,
        gpu_memory_utilization: float = 0.15,
        max_model_len: int | None = None,
        dtype: str = "auto",
        prefix_caching: bool = True,
        block_size: int | None = None,
    ) -> AsyncIterator[InProcessCritic]:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        if block_size is None and prefix_caching and current_platform.is_cpu():
            block_size = CPU_BLOCK_SIZE  # vLLM's CPU default, 128, would cache almost nothing here
        args = AsyncEngineArgs(
            model=model,
            runner="pooling",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            enable_prefix_caching=prefix_caching,
            block_size=block_size,
            worker_extension_cls="espo_server.critic_worker.CriticWorker",
        )
        async with running_async_llm(args, "critic") as llm:
            critic = cls(llm, model, prefix_caching=prefix_caching)
            metrics.CRITIC_VERSION.set(0)
            yield critic

    async def _one(self, prefix: Sequence[int]) -> tuple[float, int]:
        from vllm.pooling_params import PoolingParams

        # `classify` pools the last token, so vLLM may take the prefix's earlier KV from its cache.
        params = PoolingParams(task="classify", use_activation=False)
        request_id = f"critic-{next(self._ids)}"
        out = None
        async for final in self.llm.encode({"prompt_token_ids": list(prefix)}, params, request_id):
            out = final
        if out is None:
            raise CriticError("critic engine returned nothing")
        return float(out.outputs.data.reshape(-1)[-1]), len(prefix) - int(out.num_cached_tokens or 0)

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        async with self.gate.shared():
            version = self.version
            answers = await asyncio.gather(*(self._one(p) for p in prefixes))
        return CriticAnswer([v for v, _ in answers], [n for _, n in answers], version)

    async def check(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise CriticError(f"critic engine unhealthy: {exc!r}") from exc

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        problem = checkpoint_problem(path, self.model)
        if problem:
            raise InvalidRequest(f"{problem}; the critic still serves version {self.version}", "path")
        current = self.version or 0
        new_version = current + 1 if version is None else version
        async with self.gate.exclusive():
            started = time.perf_counter()
            try:
                refused = await self._reload(path)
            except Exception as exc:
                raise await self._roll_back(path, exc) from exc
            if refused:
                raise InvalidRequest(
                    f"{refused}; nothing was changed, the critic still serves version {current}", "path"
                )
            self.version, self.weights_dir = new_version, str(path)
            seconds = time.perf_counter() - started
        log.info("critic weights %s serving as version %d (%.2fs)", path, new_version, seconds)
        return new_version, seconds

    async def _reload(self, path: str) -> str | None:
        """Load `path` in every worker, then drop the KV cached under the old weights."""
        refusals = await self.llm.collective_rpc("espo_reload_critic", args=(str(path), self.model))
        await self.llm.reset_prefix_cache()
        return next((r for r in refusals if r), None)

    async def _roll_back(self, path: str, exc: Exception) -> ServiceError:
        """The engine failed while loading `path`: load the weights that served before."""
        log.error("loading critic weights %s failed (%r); rolling back to %s", path, exc, self.weights_dir)
        try:
            refused = await self._reload(self.weights_dir)
        except Exception as again:
            refused = repr(again)
        if refused:
            return CriticError(
                f"loading critic weights {path} failed ({exc}) and so did rolling back to "
                f"{self.weights_dir} ({refused}): the critic is down"
            )
        return InvalidRequest(
            f"loading critic weights {path} failed in the engine ({exc}); rolled back, the critic still "
            f"serves version {self.version}",
            "path",
        )


class _HttpCritic(_Values):
    """Shared HTTP plumbing of the remote critics: one pooled httpx client (connections are kept
    alive and reused by every batch), errors as CriticError."""

    name: str
    version: int | None = None

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    async def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        kwargs = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._client.post(path, json=body, **kwargs)
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code in (400, 403):
            error = _error_of(response)
            kind = InvalidRequest if response.status_code == 400 else Forbidden
            raise kind(f"critic at {self.base_url}: {error.get('message')}", error.get("param"))
        if response.status_code == 401:
            raise CriticError(f"critic at {self.base_url} refused our bearer token: set --critic-api-key")
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


def _error_of(response: httpx.Response) -> dict:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return error if isinstance(error, dict) else {"message": response.text[:200]}


class EspoValuesCritic(_HttpCritic):
    """Our critic protocol: `POST /v1/values {"token_ids": [[...]]}` -> `{"values", "critic_version",
    "computed_tokens"}`; pushes go to its `POST /v1/critic/weights`."""

    name = "remote"

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        body = await self._post("/v1/values", {"token_ids": [list(p) for p in prefixes]})
        try:
            values = [float(v) for v in body["values"]]
            computed = body.get("computed_tokens") or [len(p) for p in prefixes]
            version = body.get("critic_version")
            answer = CriticAnswer(
                values, [int(n) for n in computed], None if version is None else int(version)
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CriticError(f"malformed /v1/values answer: {str(body)[:200]}") from exc
        if answer.version is not None:
            self.version = answer.version
        return answer

    async def refresh_version(self) -> None:
        """Ask the critic server which version it serves (best effort: start-up, /v1/info)."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            response = await self._client.get("/v1/info")
            if response.status_code == 200:
                self.version = int(response.json()["critic_version"])

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        body = {"path": path} if version is None else {"path": path, "version": version}
        answer = await self._post("/v1/critic/weights", body, timeout=PUSH_TIMEOUT_S)
        try:
            self.version = int(answer["critic_version"])
            return self.version, float(answer["load_time_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CriticError(f"malformed /v1/critic/weights answer: {str(answer)[:200]}") from exc


class VllmPoolingCritic(_HttpCritic):
    """vLLM's `POST /pooling` with `task=classify` (LAST pooling: the server reuses cached prefixes).
    vLLM serves a `*ForTokenClassification` model with `token_classify` only, unless it was started
    with `--pooler-config '{"task": "classify"}'`; against such a server this client falls back to
    `token_classify` (per-token outputs, the last one taken: whole prefixes re-encoded) and says so
    in the log. A stock vLLM server reports neither a weights version nor its cache hits, so its
    queries count whole prefixes; it cannot be pushed weights from here."""

    name = "vllm-pooling"

    def __init__(self, base_url: str, *, model: str | None = None, task: str = "classify", **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self.model = model
        self.task = task

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        body: dict = {"input": [list(p) for p in prefixes], "task": self.task, "use_activation": False}
        if self.model:
            body["model"] = self.model
        try:
            answer = await self._post("/pooling", body)
        except InvalidRequest as exc:
            if self.task != "classify" or "task" not in f"{exc.param} {exc.message}":
                raise CriticError(str(exc)) from exc
            log.warning(
                "the vLLM critic at %s does not serve `classify` (%s): falling back to token_classify, "
                'which re-encodes every prefix; start it with --pooler-config \'{"task": "classify"}\'',
                self.base_url,
                exc.message,
            )
            self.task = "token_classify"
            return await self.score(prefixes)
        try:
            rows = sorted(answer["data"], key=lambda d: d["index"])
            values = [_last_value(row["data"]) for row in rows]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CriticError(f"malformed /pooling answer: {str(answer)[:200]}") from exc
        return CriticAnswer(values, [len(p) for p in prefixes], None)

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        raise InvalidRequest(
            f"this server's critic is a stock `vllm serve` at {self.base_url}, which takes no weight "
            "pushes from here: run `espo-server critic` as the critic (--critic remote) to push to it",
            None,
        )


def _last_value(data) -> float:
    """Per-token output [[v], [v], ...] or [v, v, ...], or LAST pooling's [v] -> the last value."""
    last = data[-1]
    return float(last[0] if isinstance(last, list) else last)
