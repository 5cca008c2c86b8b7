"""HTTP routes: thin handlers over `RolloutService`, one error envelope, cancellation on disconnect.

`build_app(config)` starts the engines in the app's lifespan (or takes a ready service, for tests
that manage engines themselves). Handlers take the service from `app.state` and translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict
from typing import TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter

from espo_client.protocol import (
    CommitRequest,
    DoneEvent,
    ErrorBody,
    ErrorEvent,
    ErrorResponse,
    EspoState,
    HealthResponse,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RolloutStreamEvent,
    StateResponse,
    TrajectoryEvent,
    WeightsRequest,
    WeightsResponse,
)

from .config import ServerConfig
from .critic import CriticError
from .rollout import CallPlan, InvalidRequest, RolloutService

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_RESPONSES: dict[int | str, dict] = {
    # "4XX" also keeps FastAPI from documenting its own 422 body, which this server never sends.
    "4XX": {
        "model": ErrorResponse,
        "description": "Invalid request (400, error.param names the field) "
        "or missing/wrong bearer token (401)",
    },
    503: {"model": ErrorResponse, "description": "Engine or critic not available"},
}
_STREAM_RESPONSE = {
    200: {
        "description": "JSON RolloutResponse; with ?stream=true, NDJSON lines of RolloutStreamEvent",
        "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/RolloutStreamEvent"}}},
    }
}


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    """One mapper from exception to status: 4xx for the caller's mistakes, 503 for a down engine."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(
                400, f"request body is not valid JSON: {first.get('msg')}", "invalid_request_error"
            )
        param = _param_of(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more problems)"
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(400, exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = "authentication_error" if exc.status_code == 401 else "http_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(CriticError)
    async def _critic(_: Request, exc: CriticError) -> JSONResponse:
        return error_response(503, str(exc), "critic_unavailable")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(503, f"engine error: {exc.__class__.__name__}: {exc}", "engine_error")


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client goes away (the engine requests are then aborted)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client disconnected; rollout cancelled")
        raise asyncio.CancelledError
    return task.result()


def build_app(config: ServerConfig, service: RolloutService | None = None) -> FastAPI:
    """The app. Without `service`, the lifespan starts the engines from `config` and stops them."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            app.state.service = service
            yield
            return
        from .serve import launch_service

        async with launch_service(config) as started:
            app.state.service = started
            yield

    app = FastAPI(
        title="espo-server",
        version="0.1.0",
        summary="vLLM rollouts for PPO with ESPO early stopping",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    def get_service(request: Request) -> RolloutService:
        svc = getattr(request.app.state, "service", None)
        if svc is None:
            raise HTTPException(503, "engine is starting")
        return svc

    async def authorised(request: Request) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise HTTPException(401, "missing or wrong bearer token")

    v1 = [Depends(authorised)]
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
            return StreamingResponse(_ndjson(svc, plan), media_type="application/x-ndjson")
        return await run_until_disconnect(request, svc.rollouts(body))

    @app.get("/v1/espo/state", response_model=StateResponse, dependencies=v1, responses=v1_errors)
    async def get_state(svc: RolloutService = Depends(get_service)) -> StateResponse:
        return _state_response(svc)

    @app.put("/v1/espo/state", response_model=StateResponse, dependencies=v1, responses=v1_errors)
    async def put_state(body: EspoState, svc: RolloutService = Depends(get_service)) -> StateResponse:
        svc.set_state(body)
        return _state_response(svc)

    @app.post("/v1/espo/commit", response_model=StateResponse, dependencies=v1, responses=v1_errors)
    async def commit(
        body: CommitRequest | None = None, svc: RolloutService = Depends(get_service)
    ) -> StateResponse:
        svc.commit(body.batch_id if body else None)
        return _state_response(svc)

    @app.post("/v1/weights", response_model=WeightsResponse, dependencies=v1, responses=v1_errors)
    async def weights(body: WeightsRequest, svc: RolloutService = Depends(get_service)) -> WeightsResponse:
        version, seconds = await svc.load_weights(body.path, body.version)
        return WeightsResponse(policy_version=version, load_time_s=round(seconds, 4))

    @app.get("/v1/info", response_model=InfoResponse, dependencies=v1, responses=v1_errors)
    async def info(svc: RolloutService = Depends(get_service)) -> InfoResponse:
        engine = svc.engine
        return InfoResponse(
            model=engine.model,
            policy_version=engine.policy_version,
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_id=engine.eos_token_id,
            max_n=config.max_n,
            max_prompts=config.max_prompts,
            critic=svc.critic.name if svc.critic else "none",
            critic_fallback=config.critic_fallback,
            default_stop_rule=config.default_stop_rule,
            rule_defaults=asdict(svc.rule_defaults),
            entropy_top_k=config.entropy_top_k,
            state=svc.state(),
            verifier=config.verifier_name(),
        )

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def readyz(request: Request):
        svc: RolloutService | None = getattr(request.app.state, "service", None)
        if svc is None:
            return JSONResponse(HealthResponse(status="starting").model_dump(), status_code=503)
        detail: dict[str, str] = {}
        try:
            await svc.engine.check_health()
            detail["engine"] = "ok"
        except Exception as exc:
            detail["engine"] = f"down: {exc!r}"
        if svc.critic is not None:
            try:
                await svc.critic.check()
                detail["critic"] = "ok"
            except CriticError as exc:
                detail["critic"] = f"down: {exc}"
        ok = all(v == "ok" for v in detail.values())
        body = HealthResponse(status="ready" if ok else "unavailable", detail=detail)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    def openapi_with_stream_events() -> dict:
        """FastAPI's schema plus the NDJSON event models of `?stream=true`, which no route returns as JSON."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            events = TypeAdapter(RolloutStreamEvent).json_schema(
                mode="serialization", ref_template="#/components/schemas/{model}"
            )
            components = schema["components"]["schemas"]
            for name, definition in events.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["RolloutStreamEvent"] = events
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_stream_events  # type: ignore[method-assign]

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _state_response(svc: RolloutService) -> StateResponse:
    batch = svc.ledger.open
    return StateResponse(
        state=svc.state(),
        open_batch_id=batch.batch_id if batch else None,
        open_batch_calls=batch.calls if batch else 0,
    )


async def _ndjson(svc: RolloutService, plan: CallPlan) -> AsyncIterator[bytes]:
    """NDJSON lines (protocol `RolloutStreamEvent`): a TrajectoryEvent per trajectory as it ends, then
    one DoneEvent, or an ErrorEvent if the call fails after the 200 was sent. Starlette cancels this
    generator when the client disconnects, which aborts the engine requests."""

    def line(event: TrajectoryEvent | DoneEvent | ErrorEvent) -> bytes:
        return (event.model_dump_json() + "\n").encode()

    try:
        async for item in svc.stream(plan):
            if isinstance(item, RolloutResponse):
                yield line(DoneEvent(response=item.model_copy(update={"trajectories": []})))
            else:
                yield line(TrajectoryEvent(trajectory=item))
    except InvalidRequest as exc:
        yield line(
            ErrorEvent(
                error=ErrorBody(message=exc.message, type="invalid_request_error", param=exc.param, code=400)
            )
        )
    except Exception as exc:
        log.exception("stream failed")
        yield line(
            ErrorEvent(
                error=ErrorBody(message=f"{exc.__class__.__name__}: {exc}", type="engine_error", code=503)
            )
        )
