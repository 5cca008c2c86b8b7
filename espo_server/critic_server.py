"""`espo-server critic`: a critic model's routes.

    POST /v1/values          {"token_ids": [[...], ...]} -> values, critic_version, computed_tokens
    POST /v1/critic/weights  {"path", "version"}: load new critic weights in place (the same route
                             as the rollout server's, which forwards it here with `--critic remote`)
    /v1/critic/weights/uploads/...  the same weights streamed over HTTP (upload_routes; the rollout
                             server relays its critic uploads here with `--critic remote`)
    GET  /v1/info            model, critic version, limits, prefix caching
    GET  /health, /metrics

Start-up (serve.run_critic_server) starts the critic engine and hands it to `build_critic_app`.
Behind the same bearer token as the rollout server (`--api-key`, env ESPO_API_KEY: every /v1 route
needs it; /health and /metrics do not), and a push loads only from its `--weights-dir` directories.
With `--admin-port`, the push route answers on that port only (ports.py); /metrics serves this
process's critic series: its engine's `vllm:*` (espo_engine="critic") and the critic's `espo_*`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from espo_client.protocol import (
    CriticInfoResponse,
    CriticValuesRequest,
    CriticValuesResponse,
    CriticWeightsRequest,
    CriticWeightsResponse,
    ErrorResponse,
    HealthResponse,
)

from .critic import push_weights
from .critic_engine import InProcessCritic
from .errors import InvalidRequest, bearer_matches, install_error_handlers
from .metrics import critic_process_registry, timed_push
from .openapi_links import with_id_links
from .ports import admin_only
from .upload_routes import upload_router
from .upload_targets import LocalUploads
from .uploads import UploadStore
from .weights import allowed_weights_dir

_ERRORS: dict[int | str, dict] = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request (error.param names the field)"},
    503: {"model": ErrorResponse, "description": "Critic engine not available"},
}


def build_critic_app(
    critic: InProcessCritic,
    *,
    api_key: str | None = None,
    weights_dir: list[Path] | None = None,
    admin_port: int | None = None,
    upload_store: UploadStore | None = None,
) -> FastAPI:
    app = FastAPI(title="espo-server critic", version="0.1.0")
    install_error_handlers(app)
    roots = list(weights_dir or [])

    async def authorised(request: Request) -> None:
        if api_key and not bearer_matches(request.headers.get("authorization", ""), api_key):
            raise HTTPException(401, "missing or wrong bearer token")

    v1 = [Depends(authorised)]
    admin = [*v1, Depends(admin_only(admin_port))]
    registry = critic_process_registry()
    limit = critic.llm.model_config.max_model_len
    vocab = critic.llm.model_config.get_vocab_size()

    @app.post("/v1/values", response_model=CriticValuesResponse, responses=_ERRORS, dependencies=v1)
    async def values(body: CriticValuesRequest) -> CriticValuesResponse:
        for i, prefix in enumerate(body.token_ids):
            if not prefix or len(prefix) > limit or any(not 0 <= t < vocab for t in prefix):
                raise InvalidRequest(
                    f"token_ids[{i}] must be 1..{limit} ids in [0, {vocab})", f"token_ids[{i}]"
                )
        answer = await critic.score(body.token_ids)
        return CriticValuesResponse(
            values=answer.values, critic_version=answer.version, computed_tokens=answer.computed_tokens
        )

    @app.post(
        "/v1/critic/weights", response_model=CriticWeightsResponse, responses=_ERRORS, dependencies=admin
    )
    @timed_push("critic", "path")
    async def weights(body: CriticWeightsRequest) -> CriticWeightsResponse:
        allowed_weights_dir(body.path, roots)  # 403 outside --weights-dir
        return await load(body.path, body.version)

    async def load(path: str | Path, version: int | None) -> CriticWeightsResponse:
        version, seconds = await push_weights(critic, str(path), version)
        return CriticWeightsResponse(critic_version=version, load_time_s=round(seconds, 4))

    if upload_store is not None:
        uploads = LocalUploads(upload_store, timed_push("critic", "upload")(load))
        prefix, answer = "/v1/critic/weights/uploads", CriticWeightsResponse
        app.include_router(upload_router(prefix, "critic", lambda _: uploads, answer, admin, _ERRORS))

    @app.get("/v1/info", response_model=CriticInfoResponse, dependencies=v1)
    async def info() -> CriticInfoResponse:
        return CriticInfoResponse(
            model=critic.model,
            critic_version=critic.version or 0,
            weights=critic.weights_dir,
            max_model_len=limit,
            vocab_size=vocab,
            prefix_caching=critic.prefix_caching,
            block_size=critic.block_size,
        )

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        await critic.check()
        return HealthResponse(status="ok")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return with_id_links(app)
