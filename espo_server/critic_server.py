"""`espo-server critic`: serve a critic model over `POST /v1/values` (the hosted-critic protocol)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

from espo_client.protocol import CriticValuesRequest, CriticValuesResponse, HealthResponse

from .app import error_response, install_error_handlers
from .critic import InProcessCritic


def build_critic_app(
    model: str, *, gpu_memory_utilization: float = 0.15, max_model_len: int | None = None, dtype: str = "auto"
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with InProcessCritic.launch(
            model, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype
        ) as critic:
            app.state.critic = critic
            yield

    app = FastAPI(title="espo-server critic", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    @app.post("/v1/values", response_model=CriticValuesResponse)
    async def values(body: CriticValuesRequest, request: Request):
        critic: InProcessCritic = request.app.state.critic
        limit = critic.llm.model_config.max_model_len
        vocab = critic.llm.model_config.get_vocab_size()
        for i, prefix in enumerate(body.token_ids):
            if not prefix or len(prefix) > limit or any(not 0 <= t < vocab for t in prefix):
                return error_response(
                    400,
                    f"token_ids[{i}] must be 1..{limit} ids in [0, {vocab})",
                    "invalid_request_error",
                    f"token_ids[{i}]",
                )
        return CriticValuesResponse(values=await critic.values(body.token_ids))

    @app.get("/health", response_model=HealthResponse)
    async def health(request: Request) -> HealthResponse:
        await request.app.state.critic.check()
        return HealthResponse(status="ok")

    return app
