"""Starting and stopping vLLM's AsyncLLM, for the policy and the critic alike: where its processes
run (on CPU: the worker spawned or inline, and its cores), the engine's metric series, and a
shutdown that leaves nothing for `AsyncLLM.__del__` to trip over at exit."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

from . import metrics
from .process import engine_spawn_env, inline_cores

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.asynccontextmanager
async def running_async_llm(
    args, what: str, cpu_cores: str | None = None, cpu_worker: str = "inline", cores_share: str = "first"
) -> AsyncIterator[AsyncLLM]:
    """An AsyncLLM from engine args, shut down on exit whatever happened (policy and critic alike).
    On CPU: its worker's threads bound to `cpu_cores` when given, and with `cpu_worker="inline"` and
    one worker, that worker run in the engine process (vLLM's `uni` executor), which saves starting
    a second Python process (process.engine_spawn_env); an inline worker named no cores gets its
    `cores_share` of them (process.inline_cores)."""
    started = time.perf_counter()
    llm = start_async_llm(args, cpu_cores, cpu_worker, cores_share)
    # Before any other engine is built: a second engine's stat logger would unregister these series.
    series = metrics.ENGINE_SERIES.adopt(what)
    log.info(
        "%s engine for %s up in %.1fs (%d vllm:* series%s)",
        what,
        args.model,
        time.perf_counter() - started,
        series,
        "; worker inline" if args.distributed_executor_backend == "uni" else "",
    )
    try:
        yield llm
    finally:
        metrics.ENGINE_SERIES.release(what)
        shutdown_engine(llm)


def start_async_llm(
    args, cpu_cores: str | None = None, cpu_worker: str = "inline", cores_share: str = "first"
) -> AsyncLLM:
    """AsyncLLM.from_engine_args, its processes spawned with their cores and worker layout
    (process.engine_spawn_env); `cpu_worker="inline"` applies only to one CPU worker."""
    from vllm.v1.engine.async_llm import AsyncLLM

    inspect_models_in_process()
    inline = cpu_worker == "inline" and one_cpu_worker(args)
    if inline:
        args.distributed_executor_backend = "uni"
        cpu_cores = inline_cores(cpu_cores, cores_share)
    with engine_spawn_env(cpu_cores, inline=inline):
        return AsyncLLM.from_engine_args(args)


def inspect_models_in_process() -> None:
    """On CPU, vLLM's model registry inspects a model class in this process, not in a new Python.

    On a cold vLLM cache (a fresh machine, a pod's new cache volume: VLLM_CACHE_ROOT/modelinfos) vLLM
    imports each architecture's class in a subprocess (registry._run_in_subprocess), so that the API
    process never initialises CUDA. On CPU there is no CUDA to keep away, and that subprocess is one
    more interpreter importing torch and vLLM before every engine: the read-only-root test's server,
    whose cache is always cold, spent 29 s there on 2 cores. On GPU vLLM's way stays."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.model_executor.models import registry

        registry._run_in_subprocess = _call_here


def _call_here(fn: Callable[[], T]) -> T:
    return fn()


def one_cpu_worker(args) -> bool:
    """Whether the engine runs on the CPU backend with a single worker (no parallelism asked)."""
    from vllm.platforms import current_platform

    single = args.tensor_parallel_size == args.pipeline_parallel_size == args.data_parallel_size == 1
    return current_platform.is_cpu() and single and args.distributed_executor_backend in (None, "uni")


def shutdown_engine(llm: AsyncLLM) -> None:
    """Shut an AsyncLLM down now, and only once.

    vLLM's `AsyncLLM.__del__` calls `shutdown()` again whenever the object is collected; at
    interpreter exit the vllm modules' globals are already None by then, and the process ends with
    "Exception ignored in: AsyncLLM.__del__ ... TypeError: 'NoneType' object is not callable" on
    stderr. After the real shutdown, the instance's `shutdown` is a no-op, so that `__del__` finds
    nothing left to do (every process that starts an engine ends through here).
    """
    try:
        llm.shutdown()
    finally:
        llm.shutdown = _shut_down  # type: ignore[method-assign]


def _shut_down(timeout: float | None = None) -> None:
    """`AsyncLLM.shutdown` once it has run: nothing left to release."""
