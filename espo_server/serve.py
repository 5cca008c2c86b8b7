"""Start-up: resolve the models, launch the engines, assemble the service, run uvicorn."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from .config import ServerConfig
from .critic import CriticClient, EspoValuesCritic, InProcessCritic, VllmPoolingCritic
from .engine import PolicyEngine
from .rollout import RolloutService, Verifier

log = logging.getLogger(__name__)


def resolve_models(config: ServerConfig) -> ServerConfig:
    """Fill in the embedded toy models (trained on first use, then cached) where none were named."""
    needs_critic = config.critic == "inprocess" and config.critic_model is None
    if config.model is not None and not needs_critic:
        return config
    from .toy.train import ensure_toy_models

    log.info("no model given: using the embedded toy models (cache %s)", config.cache_dir)
    toy = ensure_toy_models(config.cache_dir, config.toy_seed)
    return config.model_copy(
        update={
            # vLLM on CPU would run the float32 toy models in bfloat16 under "auto".
            "dtype": "float32" if config.model is None and config.dtype == "auto" else config.dtype,
            "model": config.model or str(toy.policy_dir),
            "critic_model": config.critic_model or (str(toy.critic_dir) if needs_critic else None),
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
            max_model_len=config.max_model_len,
            dtype=config.dtype,
        ) as critic:
            yield critic
    else:
        if not config.critic_url:
            raise ValueError(f"critic={config.critic} needs critic_url")
        cls = EspoValuesCritic if config.critic == "remote" else VllmPoolingCritic
        critic = cls(config.critic_url, timeout_s=config.critic_timeout_s)
        try:
            yield critic
        finally:
            await critic.aclose()


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
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            seed=config.seed,
            enforce_eager=config.enforce_eager,
        ) as engine,
        launch_critic(config) as critic,
    ):
        yield RolloutService(engine, critic, config, verifier)


def run_server(config: ServerConfig) -> None:
    import uvicorn

    from .app import build_app

    # Resolve (and if need be train) the toy models before uvicorn starts, with progress on stdout.
    config = resolve_models(config)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level=config.log_level)
