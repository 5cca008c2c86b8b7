"""HTTP routes: thin handlers over `RolloutService`, the error envelope, cancellation on disconnect.

`build_app(config)` only declares routes; start-up (serve.py) starts the engines, builds the
service and puts it on `app.state.service` before serving. Handlers take the service from there,
call it, and return protocol models; errors go through `errors.install_error_handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter

from espo_client.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from espo_client.protocol import (
    CommitRequest,
    CriticWeightsRequest,
    CriticWeightsResponse,
    DoneEvent,
    ErrorEvent,
    ErrorResponse,
    EspoState,
    GroupEvent,
    HealthResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RolloutStreamEvent,
    RunRequest,
    RunResponse,
    StateResponse,
    Trajectory,
    TrajectoryEvent,
    WeightsRequest,
    WeightsResponse,
)

from . import __version__
from .config import ServerConfig
from .errors import bearer_matches, error_body, install_error_handlers
from .events import CallDone, TokenDelta, encode
from .openai_api import OpenAIServing
from .openapi_links import add_id_links
from .ports import admin_only
from .service import RolloutService
from .upload_routes import state_target, upload_router
from .weight_files import critic_source, policy_source, weight_files_router

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_RESPONSES: dict[int | str, dict] = {
    # "4XX" also keeps FastAPI from documenting its own 422 body, which this server never sends.
    "4XX": {
        "model": ErrorResponse,
        "description": "Invalid request (400, error.param names the field), missing/wrong bearer "
        "token (401), weights outside --weights-dir or an admin route off the admin port (403), an "
        "unknown upload (404), a conflict (409: a request_id reused with another body, a busy run or "
        "batch, an upload in progress), an upload over its limit (413), too much in flight (429, with "
        "Retry-After)",
    },
    503: {"model": ErrorResponse, "description": "Engine or critic not available"},
}
_STREAM_RESPONSE = {
    200: {
        "description": "JSON RolloutResponse; with ?stream=true, NDJSON lines of RolloutStreamEvent",
        "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/RolloutStreamEvent"}}},
    }
}


CLIENT_CLOSED = 499
"""The status logged for a call whose client went away first (nginx's "client closed request"):
nobody reads it, but the access log says what happened instead of an ASGI traceback."""


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it when the client goes away (the engine requests are then aborted).
    A client that left gets `CLIENT_CLOSED`: raising CancelledError here made uvicorn log an
    "Exception in ASGI application" traceback for every abandoned call (hundreds in a soak)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (shutdown): so is the call
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client disconnected; rollout cancelled")
        return Response(status_code=CLIENT_CLOSED)
    return task.result()


def build_app(config: ServerConfig) -> FastAPI:
    """The routes. Serving needs `app.state.service` (serve.py sets it); the schema does not."""
    app = FastAPI(
        title="espo-server",
        version="0.1.0",
        summary="vLLM rollouts for PPO with ESPO early stopping",
    )
    install_error_handlers(app)

    def get_service(request: Request) -> RolloutService:
        return request.app.state.service

    async def authorised(request: Request) -> None:
        if config.api_key and not bearer_matches(request.headers.get("authorization", ""), config.api_key):
            raise HTTPException(401, "missing or wrong bearer token")

    async def engine_alive(request: Request) -> None:
        """Once the policy engine's process is gone, every /v1 call is a 503 engine_dead."""
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.check_alive()

    v1 = [Depends(authorised), Depends(engine_alive)]
    admin = [*v1, Depends(admin_only(config.admin_port))]  # ports.py: on --admin-port only, if set
    v1_errors = _ERROR_RESPONSES

    @app.post(
        "/v1/rollouts",
        response_model=RolloutResponse,
        dependencies=v1,
        responses={**v1_errors, **_STREAM_RESPONSE},
    )
    async def rollouts(
        body: RolloutRequest,
        request: Request,
        stream: bool = Query(
            False, description="NDJSON: a line per trajectory as it ends, then a done line."
        ),
        svc: RolloutService = Depends(get_service),
    ):
        if stream:
            plan = svc.plan(body)  # invalid input is answered 400 before the stream starts
            # Starlette closes the stream when the client disconnects, which aborts the engine requests.
            lines = encode(svc.stream(plan), NdjsonLines())
            return StreamingResponse(lines, media_type="application/x-ndjson")
        return await run_until_disconnect(request, svc.rollouts(body))

    @app.get("/v1/espo/state", response_model=StateResponse, dependencies=v1, responses=v1_errors)
    async def get_state(svc: RolloutService = Depends(get_service)) -> StateResponse:
        return svc.state()

    @app.put("/v1/espo/state", response_model=StateResponse, dependencies=admin, responses=v1_errors)
    async def put_state(body: EspoState, svc: RolloutService = Depends(get_service)) -> StateResponse:
        return svc.set_state(body)

    @app.post("/v1/espo/commit", response_model=StateResponse, dependencies=admin, responses=v1_errors)
    async def commit(
        body: CommitRequest | None = None, svc: RolloutService = Depends(get_service)
    ) -> StateResponse:
        return svc.commit(body.batch_id if body else None)

    @app.post("/v1/weights", response_model=WeightsResponse, dependencies=admin, responses=v1_errors)
    async def weights(body: WeightsRequest, svc: RolloutService = Depends(get_service)) -> WeightsResponse:
        return await svc.load_weights(body.path, body.version)

    @app.post("/v1/runs", response_model=RunResponse, dependencies=v1, responses=v1_errors)
    async def open_run(
        body: RunRequest | None = None, svc: RolloutService = Depends(get_service)
    ) -> RunResponse:
        return svc.open_run(body or RunRequest())

    @app.get("/v1/runs/{run_id}", response_model=RunResponse, dependencies=v1, responses=v1_errors)
    async def get_run(run_id: str, svc: RolloutService = Depends(get_service)) -> RunResponse:
        return svc.run(run_id)

    @app.delete("/v1/runs/{run_id}", response_model=RunResponse, dependencies=v1, responses=v1_errors)
    async def close_run(run_id: str, svc: RolloutService = Depends(get_service)) -> RunResponse:
        return await svc.close_run(run_id)

    @app.post(
        "/v1/critic/weights", response_model=CriticWeightsResponse, dependencies=admin, responses=v1_errors
    )
    async def critic_weights(
        body: CriticWeightsRequest, svc: RolloutService = Depends(get_service)
    ) -> CriticWeightsResponse:
        return await svc.load_critic_weights(body.path, body.version)

    for what, prefix, answer, source in (
        ("policy", "/v1/weights", WeightsResponse, policy_source),
        ("critic", "/v1/critic/weights", CriticWeightsResponse, critic_source),
    ):
        app.include_router(
            upload_router(f"{prefix}/uploads", what, state_target(what), answer, admin, v1_errors)
        )
        app.include_router(weight_files_router(f"{prefix}/files", what, source, admin, v1_errors))  # joins

    @app.get("/v1/info", response_model=InfoResponse, dependencies=v1, responses=v1_errors)
    async def info(svc: RolloutService = Depends(get_service)) -> InfoResponse:
        return svc.info()

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def readyz(svc: RolloutService = Depends(get_service)):
        ok, detail = await svc.readiness()
        body = HealthResponse(status="ready" if ok else "unavailable", detail=detail)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    def openapi_with_stream_events() -> dict:
        """FastAPI's schema plus the NDJSON event models of `?stream=true`, which no route returns as JSON,
        and the links from the ids answers hand out to the routes that take them (openapi_links.py)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            events = TypeAdapter(RolloutStreamEvent).json_schema(
                mode="serialization", ref_template="#/components/schemas/{model}"
            )
            components = schema["components"]["schemas"]
            for name, definition in events.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["RolloutStreamEvent"] = events
            for chunk in (CompletionChunk, ChatCompletionChunk):  # the OpenAI routes' server-sent events
                chunk_schema = TypeAdapter(chunk).json_schema(
                    mode="serialization", ref_template="#/components/schemas/{model}"
                )
                for name, definition in chunk_schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[chunk.__name__] = chunk_schema
            app.openapi_schema = add_id_links(schema)
        return app.openapi_schema

    app.openapi = openapi_with_stream_events  # type: ignore[method-assign]

    # ---------------------------------------------------------------- OpenAI-compatible (openai_api.py)

    def get_openai(request: Request) -> OpenAIServing:
        state = request.app.state
        if getattr(state, "openai", None) is None:
            state.openai = OpenAIServing(state.service, config)
        return state.openai

    @app.get("/v1/models", response_model=ModelList, dependencies=v1, responses=v1_errors)
    async def models(oai: OpenAIServing = Depends(get_openai)) -> ModelList:
        return oai.models()

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        dependencies=v1,
        responses={**v1_errors, 404: {"model": ErrorResponse}, **_sse_response(CompletionChunk)},
    )
    async def completions(
        body: CompletionRequest, request: Request, oai: OpenAIServing = Depends(get_openai)
    ):
        call = oai.completion_call(body)  # invalid input is answered 4xx before any stream starts
        if body.stream:
            return StreamingResponse(oai.sse(call), media_type="text/event-stream")
        return await run_until_disconnect(request, oai.respond(call))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        dependencies=v1,
        responses={**v1_errors, 404: {"model": ErrorResponse}, **_sse_response(ChatCompletionChunk)},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, oai: OpenAIServing = Depends(get_openai)
    ):
        call = oai.chat_call(body)
        if body.stream:
            return StreamingResponse(oai.sse(call), media_type="text/event-stream")
        return await run_until_disconnect(request, oai.respond(call))

    # vLLM's own serving routes that clients of vLLM poll or call (TRL's VLLMClient, vllm bench serve)

    @app.get(
        "/health",
        response_class=Response,
        responses={
            200: {"description": "The policy engine lives (empty body)"},
            503: {"description": "The policy engine is dead"},
        },
    )
    async def health(svc: RolloutService = Depends(get_service)) -> Response:
        """vLLM's liveness check: 200 with an empty body while the policy engine lives, else 503."""
        try:
            await svc.engine.check_health()
        except Exception:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        import vllm

        return VersionResponse(version=vllm.__version__, espo_server=__version__)

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=v1, responses=v1_errors)
    async def tokenize(
        body: TokenizeCompletionRequest | TokenizeChatRequest, oai: OpenAIServing = Depends(get_openai)
    ) -> TokenizeResponse:
        oai.check_model(body.model)
        return oai.prompts.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=v1, responses=v1_errors)
    async def detokenize(
        body: DetokenizeRequest, oai: OpenAIServing = Depends(get_openai)
    ) -> DetokenizeResponse:
        oai.check_model(body.model)
        return oai.prompts.detokenize(body)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse_response(chunk: type) -> dict:
    """The 200 of an OpenAI route: JSON, or with `stream: true` server-sent events of `chunk`."""
    return {
        200: {
            "description": f"JSON; with stream: true, server-sent events `data: {chunk.__name__}` "
            "per finished choice, then `data: [DONE]`",
            # each server-sent event (as SSE tools see one): its `data` is a JSON-encoded chunk, or
            # the literal [DONE] that ends the stream
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string"},
                            "data": {
                                "description": f"a JSON-encoded {chunk.__name__}, or [DONE] (the last)",
                                "anyOf": [
                                    {"const": "[DONE]"},
                                    {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                    },
                                ],
                            },
                        },
                        "required": ["data"],
                    }
                }
            },
        }
    }


class NdjsonLines:
    """A call's events as NDJSON lines (protocol `RolloutStreamEvent`): a TrajectoryEvent per
    trajectory as it ends, a GroupEvent as each prompt group completes, then one DoneEvent, or an
    ErrorEvent if the call fails after the 200 was sent."""

    def tokens(self, delta: TokenDelta) -> None:
        return None  # the trajectory carries every token (a plan without token_events sends none)

    def trajectory(self, trajectory: Trajectory) -> bytes:
        return _line(TrajectoryEvent(trajectory=trajectory))

    def group(self, event: GroupEvent) -> bytes:
        return _line(event)

    def done(self, done: CallDone) -> bytes:
        return _line(DoneEvent(response=done.summary))

    def error(self, exc: Exception) -> bytes:
        log.exception("stream failed")
        return _line(ErrorEvent(error=error_body(exc)))


def _line(event: TrajectoryEvent | GroupEvent | DoneEvent | ErrorEvent) -> bytes:
    return (event.model_dump_json() + "\n").encode()
