"""Start-up: resolve the models, launch the engines, assemble the service, serve the app.

Start-up owns the engines' lifetime (vLLM's pattern): the engines and the critic are started in an
async context manager *outside* the app, the app is built and handed the running service, uvicorn
serves it in the same event loop, and on exit (SIGTERM, Ctrl-C) the engines are shut down.

    run_server(config):  resolve_models -> launch_service (engines, critic, RolloutService)
                         -> upload_targets (where weight uploads are staged or relayed)
                         -> joining (--join: a peer's weights and state copied in the background)
                         -> build_app(config) -> app.state.service = service -> uvicorn
                            (and, with --grpc-port, grpc_server.py's gRPC server in the same loop)

How `serve` ends (docs/reliability.md):
- SIGTERM (an orchestrator stopping the pod): the server drains. New work is answered 503
  `shutting_down` with Retry-After and /readyz turns 503, while the listener stays open; running
  calls get `shutdown_grace_s` to finish and be answered; those still running then are ended with
  that 503 (nothing of them folded in). Then uvicorn closes, the runs' carried samples are aborted,
  the engines shut down, and the process exits 0. A second SIGTERM ends the running calls at once.
- The policy engine's process dies (vLLM's EngineDeadError): every /v1 call is answered 503
  `engine_dead` (running calls too), /readyz is 503, and `engine_dead_linger_s` later the process
  exits with ENGINE_DEAD_EXIT_CODE, for its supervisor to restart it.
- SIGINT (Ctrl-C): uvicorn's own graceful shutdown (vLLM's engine process, in the same process
  group, gets the signal too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from . import heap_trim
from .app import build_app
from .config import ServerConfig
from .critic import CriticClient
from .critic_engine import InProcessCritic
from .critic_http import EspoValuesCritic, VllmPoolingCritic
from .critic_server import build_critic_app
from .engine import Parallelism, PolicyEngine
from .join import joining
from .plan import Verifier
from .ports import serve as serve_on_ports
from .service import RolloutService
from .tiny_model import CHAT_TEMPLATE
from .upload_targets import staging_root, upload_targets
from .uploads import UploadStore

EMBEDDED_NAME = "espo-toy"
"""The OpenAI-compatible API's model name of the embedded toy model."""

log = logging.getLogger(__name__)
T = TypeVar("T")

ENGINE_DEAD_EXIT_CODE = 3
"""Exit status of `espo-server serve` after its policy engine's process died."""
WATCHDOG_INTERVAL_S = 0.5
"""How often the engine's liveness is looked at (vLLM's own monitor thread notices a death at once)."""
UVICORN_GRACE_S = 5.0
"""uvicorn's own graceful-shutdown timeout, once the drain has answered the calls (or on Ctrl-C)."""
KEEP_ALIVE_S = 75
"""How long an idle keep-alive connection stays open (uvicorn's default: 5 s). Clients pool idle
connections for 5 s (httpx's default); one reused just as a 5-s server closes it fails with a
ReadError (seen: a learner's critic push answered 503). Longer here: pooled clients drop theirs first."""


def resolve_models(config: ServerConfig) -> ServerConfig:
    """Fill in the embedded toy models (trained on first use, then cached) where none were named, and
    settle `verifier=auto` (the toy verifier for the embedded toy policy) before the model path is."""
    if config.verifier == "auto":
        config = config.model_copy(update={"verifier": "toy" if config.embedded else "none"})
    needs_critic = config.critic == "inprocess" and config.critic_model is None
    if config.model is not None and not needs_critic:
        return config
    from .toy.train import ensure_toy_models

    log.info("no model given: the embedded toy models (%s; cache %s)", config.toy_size, config.cache_dir)
    toy = ensure_toy_models(config.cache_dir, config.toy_seed, quick=config.toy_size == "quick")
    return config.model_copy(
        update={
            # vLLM on CPU would run the float32 toy models in bfloat16 under "auto".
            "dtype": "float32" if config.model is None and config.dtype == "auto" else config.dtype,
            "model": config.model or str(toy.policy_dir),
            "critic_model": config.critic_model or (str(toy.critic_dir) if needs_critic else None),
            # The toy models cached before the tiny tokenizer had a chat template lack one.
            "chat_template": config.chat_template or (CHAT_TEMPLATE if config.model is None else None),
            "served_model_name": config.served_model_name
            or (EMBEDDED_NAME if config.model is None else None),
        }
    )


def make_verifier(name: str | None) -> Verifier | None:
    if name is None:
        return None
    if name == "toy":
        from .toy.task import verify

        return lambda prompt, response, answer: verify(prompt, response, answer).reward
    raise ValueError(f"unknown verifier {name!r}")


@contextlib.asynccontextmanager
async def launch_critic(config: ServerConfig) -> AsyncIterator[CriticClient | None]:
    if config.critic == "none":
        yield None
    elif config.critic == "inprocess":
        assert config.critic_model is not None
        async with InProcessCritic.launch(
            config.critic_model,
            gpu_memory_utilization=config.critic_gpu_memory_utilization,
            kv_cache_memory_bytes=config.critic_kv_cache_memory_bytes,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            prefix_caching=config.critic_prefix_caching,
            block_size=config.critic_block_size,
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.critic_max_num_seqs,
            max_num_batched_tokens=config.critic_max_num_batched_tokens,
            cpu_cores=config.critic_cpu_cores,
            cpu_worker=config.cpu_worker,
            cores_share="last",  # beside the policy, which takes all cores but the last
        ) as critic:
            yield critic
    else:
        if not config.critic_url:
            raise ValueError(f"critic={config.critic} needs critic_url")
        cls = EspoValuesCritic if config.critic == "remote" else VllmPoolingCritic
        api_key = config.critic_api_key or config.api_key
        critic = cls(config.critic_url, timeout_s=config.critic_timeout_s, api_key=api_key)
        if isinstance(critic, EspoValuesCritic):
            await critic.refresh_version()  # best effort: the critic may still be starting
        try:
            yield critic
        finally:
            await critic.aclose()


def parallelism(config: ServerConfig) -> Parallelism:
    """The policy engine's vLLM parallelism, from the settings of the same names."""
    return Parallelism(
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        enable_expert_parallel=config.enable_expert_parallel,
    )


@contextlib.asynccontextmanager
async def launch_service(config: ServerConfig) -> AsyncIterator[RolloutService]:
    """Engines up, service assembled; everything shut down on exit."""
    config = resolve_models(config)
    assert config.model is not None
    verifier = make_verifier(config.verifier_name())
    async with (
        PolicyEngine.launch(
            config.model,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            parallel=parallelism(config),
            cpu_cores=config.cpu_cores,
            cpu_worker=config.cpu_worker,
        ) as engine,
        launch_critic(config) as critic,
    ):
        service = RolloutService(engine, critic, config, verifier)
        try:
            yield service
        finally:
            await service.aclose()  # runs' carried samples are aborted before the engines go


def run_server(config: ServerConfig) -> int:
    """`espo-server serve`: until SIGTERM / Ctrl-C (exit status 0) or the engine's death
    (ENGINE_DEAD_EXIT_CODE)."""
    # Resolve (and if need be train) the toy models before any engine starts, with progress on stdout.
    config = resolve_models(config)
    os.environ[heap_trim.ENV] = str(config.malloc_trim_s)  # read in the engine processes we spawn
    return _run(_serve_rollouts(config))


async def _serve_rollouts(config: ServerConfig) -> int:
    async with (
        launch_service(config) as service,
        upload_targets(service, config) as uploads,
        joining(service, config, uploads),  # --join: copy a peer's weights and state; unready till then
    ):
        app = build_app(config)
        app.state.service = service
        app.state.uploads = uploads
        async with serve_grpc(service, config, uploads):  # beside uvicorn, in the same loop (--grpc-port)
            return await serve_rollout_app(app, service, config)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM calls `on_sigterm` (which starts a drain) instead of closing
    the listener at once and cancelling what still runs after its timeout."""

    on_sigterm: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.on_sigterm is not None:
            self.on_sigterm()
            return
        super().handle_exit(sig, frame)


async def serve_rollout_app(app: FastAPI, service: RolloutService, config: ServerConfig) -> int:
    """uvicorn serving the rollout app until it ends (module docstring); returns the exit status."""
    loop = asyncio.get_running_loop()
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=int(UVICORN_GRACE_S),
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    status = 0
    drain: asyncio.Task[None] | None = None

    async def drain_then_exit() -> None:
        cut = await service.drain(config.shutdown_grace_s)
        log.info("drained (%d call(s) ended with 503): shutting down", cut)
        server.should_exit = True

    def on_sigterm() -> None:
        nonlocal drain
        if drain is None:
            log.warning("SIGTERM: draining, at most %gs for the running calls", config.shutdown_grace_s)
            drain = loop.create_task(drain_then_exit(), name="espo-drain")
        else:
            log.warning("SIGTERM again: ending the running calls now")
            service.cut_calls()

    async def watch_engine() -> None:
        nonlocal status
        while not service.engine.dead:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
        status = ENGINE_DEAD_EXIT_CODE
        log.error("the policy engine process died: /v1 calls get 503 engine_dead; exit status %d", status)
        service.fail_calls()
        await asyncio.sleep(config.engine_dead_linger_s)  # running calls fail, new ones hear why; then exit
        server.should_exit = True

    # The signal handler runs between two bytecodes of the loop's thread: it only schedules.
    server.on_sigterm = lambda: loop.call_soon_threadsafe(on_sigterm)
    watchdog = loop.create_task(watch_engine(), name="espo-engine-watchdog")
    try:
        await serve_on_ports(server, config.admin_port)  # and on --admin-port, when set
    finally:
        for task in (watchdog, drain):
            if task is not None:
                task.cancel()
    return status


@contextlib.asynccontextmanager
async def serve_grpc(
    service: RolloutService, config: ServerConfig, uploads: dict[str, Any] | None = None
) -> AsyncIterator[int | None]:
    """The gRPC API while inside, if `config.grpc_port` is set (grpcio is imported only then)."""
    if config.grpc_port is None:
        yield None
        return
    from .grpc_server import grpc_server

    async with grpc_server(service, config, uploads or {}) as port:
        yield port


def run_critic_server(
    model: str,
    *,
    host: str,
    port: int,
    gpu_memory_utilization: float | None = None,
    kv_cache_memory_bytes: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    prefix_caching: bool = True,
    block_size: int | None = None,
    api_key: str | None = None,
    weights_dir: list[Path] | None = None,
    admin_port: int | None = None,
    upload_dir: Path | None = None,
    upload_max_bytes: int | None = None,
    upload_idle_timeout_s: float = 120.0,
    enforce_eager: bool = False,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    cpu_cores: str | None = None,
    cpu_worker: str = "inline",
) -> None:
    """`espo-server critic`: the critic engine, then its app (POST /v1/values, /v1/critic/weights,
    the uploads under /v1/critic/weights/uploads; the pushes on `admin_port` only, when set)."""

    async def main() -> None:
        async with InProcessCritic.launch(
            model,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            dtype=dtype,
            prefix_caching=prefix_caching,
            block_size=block_size,
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            cpu_cores=cpu_cores,
            cpu_worker=cpu_worker,
        ) as critic:
            with staging_root(upload_dir) as root:
                store = UploadStore(
                    root, what="critic", reference=critic.model, max_bytes=upload_max_bytes,
                    idle_timeout_s=upload_idle_timeout_s, in_use=lambda: critic.weights_dir,
                )  # fmt: skip
                app = build_critic_app(
                    critic, api_key=api_key, weights_dir=weights_dir, admin_port=admin_port,
                    upload_store=store,
                )  # fmt: skip
                try:
                    await serve_app(app, host, port, "info", admin_port)
                finally:
                    await store.aclose()

    _run(main())


def _run(main: Coroutine[Any, Any, T]) -> T:
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: with the default
    # handler that would kill the process before the engines' context managers shut them down.
    # (A SIGTERM while the engines start lands here too.)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return asyncio.run(main)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


async def serve_app(
    app: FastAPI, host: str, port: int, log_level: str, admin_port: int | None = None
) -> None:
    """uvicorn in the running event loop (on `admin_port` too, if set); returns after a graceful
    shutdown (SIGTERM, SIGINT)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    await serve_on_ports(server, admin_port)
