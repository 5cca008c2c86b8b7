"""`espo-server critic`: a critic model's routes, `POST /v1/values` (the hosted-critic protocol).

Start-up (serve.run_critic_server) starts the critic engine and hands it to `build_critic_app`.
"""

from __future__ import annotations

from fastapi import FastAPI

from espo_client.protocol import CriticValuesRequest, CriticValuesResponse, HealthResponse

from .critic import InProcessCritic
from .errors import InvalidRequest, install_error_handlers


def build_critic_app(critic: InProcessCritic) -> FastAPI:
    app = FastAPI(title="espo-server critic", version="0.1.0")
    install_error_handlers(app)
    limit = critic.llm.model_config.max_model_len
    vocab = critic.llm.model_config.get_vocab_size()

    @app.post("/v1/values", response_model=CriticValuesResponse)
    async def values(body: CriticValuesRequest) -> CriticValuesResponse:
        for i, prefix in enumerate(body.token_ids):
            if not prefix or len(prefix) > limit or any(not 0 <= t < vocab for t in prefix):
                raise InvalidRequest(
                    f"token_ids[{i}] must be 1..{limit} ids in [0, {vocab})", f"token_ids[{i}]"
                )
        return CriticValuesResponse(values=await critic.values(body.token_ids))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        await critic.check()
        return HealthResponse(status="ok")

    return app
