"""The critic in this process: a vLLM pooling engine (LAST pooling, prefix caching).

Why that is cheap. vLLM's `classify` task pools the LAST token, so the engine may serve a prefix's
earlier tokens from its prefix cache: a query then computes only what no earlier query (of this
trajectory, or of another sample with the same prefix) has filled in, in whole KV blocks. The
`token_classify` task (per-token outputs) always recomputes the whole prefix: vLLM skips the prefix
cache for it. Measured on the tiny critic (CPU, 16 trajectories queried every 8 tokens up to 132
tokens): 0.32 of the prefix tokens computed with block size 32, 0.55
with 64, 1.0 without caching; values equal to HF's within 3e-7 either way. CPU's attention kernel
needs block sizes in multiples of 32 (vLLM's CPU default is 128); GPUs default to 16.

Weights: `load_weights(path, version)` checks the directory against the served critic's checkpoint
(tensor names and shapes, config architecture), then reloads in place (critic_worker.py), waiting
for queries in flight, and resets the prefix cache (cached KV of the old weights would give wrong
values). A directory that does not fit is refused (`InvalidRequest`) and the old critic goes on
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from . import metrics
from .async_llm import running_async_llm
from .config import memory_fraction
from .critic import CriticAnswer, CriticError, ValuesFromScore
from .critic_worker import checkpoint_problem
from .errors import InvalidRequest, ServiceError
from .gate import ReadWriteGate

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32
"""KV block size of the critic on CPU with prefix caching: the smallest the CPU attention kernel takes."""


class InProcessCritic(ValuesFromScore):
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
        cpu_cores: str | None = None,
        cpu_worker: str = "inline",
        cores_share: str = "first",
        **settings: Any,
    ) -> AsyncIterator[InProcessCritic]:
        """Start the critic's engine with `engine_args`' settings (on CPU, its worker on
        `cpu_cores`, spawned or inline: running_async_llm); shut it down on exit, whatever happened."""
        args = cls.engine_args(model, **settings)
        async with running_async_llm(args, "critic", cpu_cores, cpu_worker, cores_share) as llm:
            critic = cls(llm, model, prefix_caching=args.enable_prefix_caching)
            metrics.CRITIC_VERSION.set(0)
            yield critic

    @staticmethod
    def engine_args(
        model: str,
        *,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        prefix_caching: bool = True,
        block_size: int | None = None,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
    ):  # -> vllm.engine.arg_utils.AsyncEngineArgs
        """The critic's vLLM engine arguments (no engine is started). `max_num_seqs` (its slots: the
        most queries it scores at once) and `max_num_batched_tokens` (prefix tokens per step) are
        vLLM's choice when None; `gpu_memory_utilization` None: this device's default
        (config.MEMORY_FRACTIONS)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        if block_size is None and prefix_caching and current_platform.is_cpu():
            block_size = CPU_BLOCK_SIZE  # vLLM's CPU default, 128, would cache almost nothing here
        return AsyncEngineArgs(
            model=model,
            runner="pooling",
            gpu_memory_utilization=memory_fraction(
                "critic", gpu_memory_utilization, on_cpu=current_platform.is_cpu()
            ),
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            dtype=dtype,
            enable_prefix_caching=prefix_caching,
            block_size=block_size,
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            worker_extension_cls="espo_server.critic_worker.CriticWorker",
        )

    async def _one(self, prefix: Sequence[int]) -> tuple[float, int]:
        from vllm.pooling_params import PoolingParams

        # `classify` pools the last token, so vLLM may take the prefix's earlier KV from its cache.
        params = PoolingParams(task="classify", use_activation=False)
        request_id = f"critic-{next(self._ids)}"
        out = None
        ids = prefix if isinstance(prefix, list) else list(prefix)  # the query's own list: no copy
        async for final in self.llm.encode({"prompt_token_ids": ids}, params, request_id):
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
