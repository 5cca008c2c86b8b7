"""The gRPC API (`espo.v1.Rollouts`, espo_client/proto/espo.proto): a transport like app.py.

Each RPC converts its message to the protocol's pydantic model (`espo_client.grpc_codec`), calls
the same `RolloutService` method as the HTTP route, and converts the answer back. Errors get the
HTTP API's semantics as gRPC status codes:

    pydantic ValidationError, InvalidRequest   INVALID_ARGUMENT  "param: message"
    ModelNotFound                              NOT_FOUND
    Forbidden (weights outside --weights-dir)  PERMISSION_DENIED
    Conflict (reused request_id, busy run)     FAILED_PRECONDITION
    Overloaded                                 RESOURCE_EXHAUSTED
    missing/wrong bearer token                 UNAUTHENTICATED
    ReloadFailed (a push rolled back)          INTERNAL
    ServiceError (critic down), anything else  UNAVAILABLE

with the field also in the trailing metadata `espo-error-param`, the error type in `espo-error-type`
and, for errors to retry later (overloaded, shutting_down), the seconds to wait in
`espo-retry-after-s` (what HTTP sends as Retry-After). The mapping is errors.error_body, the
HTTP API's own. A cancelled call (the client went away, or cancelled it) cancels the rollout, which
aborts its engine requests, or abandons the upload. Weight uploads (UploadWeights,
UploadCriticWeights) are client-streaming calls over the same upload targets as the HTTP routes
(upload_routes.py). Started by serve.py beside uvicorn when `--grpc-port` is set.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from espo_client.grpc_codec import from_message, to_message
from espo_client.proto import espo_pb2 as pb
from espo_client.proto import espo_pb2_grpc as pb_grpc
from espo_client.protocol import (
    CommitRequest,
    CriticWeightsRequest,
    ErrorBody,
    EspoState,
    GroupEvent,
    RolloutRequest,
    RunRequest,
    Trajectory,
    UploadCommitRequest,
    UploadRequest,
    WeightsRequest,
)

from .config import ServerConfig
from .errors import InvalidRequest, bearer_matches, error_body, retry_after_s
from .events import CallDone, TokenDelta, encode
from .service import RolloutService
from .uploads import UploadTarget

log = logging.getLogger(__name__)

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""HTTP status of the error envelope -> gRPC status code."""


async def abort(context: grpc.aio.ServicerContext, body: ErrorBody, retry_after: float | None = None) -> None:
    """End the call with the status matching `body` (raises, as grpc.aio's abort does); the error's
    type, field and retry-after hint go in the trailing metadata."""
    metadata = [("espo-error-type", body.type)]
    if body.param:
        metadata.append(("espo-error-param", body.param))
    if retry_after is not None:
        metadata.append(("espo-retry-after-s", f"{retry_after:g}"))
    context.set_trailing_metadata(tuple(metadata))
    message = body.message
    if body.param and not message.startswith(body.param + ":"):
        message = f"{body.param}: {message}"  # the status message starts with the field
    await context.abort(STATUS.get(body.code, grpc.StatusCode.UNAVAILABLE), message)


class RolloutEvents:
    """A call's events as `RolloutEvent` messages; a failure is raised on, to end the call with its
    status."""

    def tokens(self, delta: TokenDelta) -> None:
        return None  # the trajectory carries every token (a plan without token_events sends none)

    def trajectory(self, trajectory: Trajectory) -> pb.RolloutEvent:
        return pb.RolloutEvent(trajectory=to_message(trajectory, pb.Trajectory))

    def group(self, event: GroupEvent) -> pb.RolloutEvent:
        return pb.RolloutEvent(group=to_message(event, pb.GroupEvent))

    def done(self, done: CallDone) -> pb.RolloutEvent:
        return pb.RolloutEvent(done=to_message(done.summary, pb.RolloutResponse))

    def error(self, exc: Exception) -> pb.RolloutEvent:
        raise exc


class RolloutsServicer(pb_grpc.RolloutsServicer):
    """espo.v1.Rollouts over a RolloutService."""

    def __init__(
        self, service: RolloutService, config: ServerConfig, uploads: dict[str, UploadTarget] | None = None
    ) -> None:
        self.service = service
        self.api_key = config.api_key
        self.uploads = uploads or {}

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        if not self.api_key:
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_matches(str(metadata.get("authorization", "")), self.api_key):
            await abort(
                context,
                ErrorBody(message="missing or wrong bearer token", type="authentication_error", code=401),
            )

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if not isinstance(exc, grpc.aio.AbortError):
            body = error_body(exc)
            if body.code >= 500:
                log.error("gRPC call failed: %r", exc, exc_info=exc)
            await abort(context, body, retry_after_s(exc))
        raise exc

    async def Rollouts(
        self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RolloutEvent]:
        await self._check(context)
        try:
            plan = self.service.plan(from_message(request, RolloutRequest))
        except Exception as exc:
            await self._fail(context, exc)
        try:
            async for message in encode(self.service.stream(plan), RolloutEvents()):
                yield message
        except Exception as exc:  # cancellation (BaseException) goes through: the stream aborts its samples
            await self._fail(context, exc)

    async def _unary(
        self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Message]]
    ) -> Message:
        """One unary call: auth, the work, every failure mapped to its status."""
        await self._check(context)
        try:
            return await work()
        except Exception as exc:
            await self._fail(context, exc)
            raise  # not reached: _fail raises

    async def GetState(self, request: empty_pb2.Empty, context) -> pb.StateResponse:
        async def work():
            return to_message(self.service.state(), pb.StateResponse)

        return await self._unary(context, work)

    async def SetState(self, request: pb.EspoState, context) -> pb.StateResponse:
        async def work():
            return to_message(self.service.set_state(from_message(request, EspoState)), pb.StateResponse)

        return await self._unary(context, work)

    async def Commit(self, request: pb.CommitRequest, context) -> pb.StateResponse:
        async def work():
            body = from_message(request, CommitRequest)
            return to_message(self.service.commit(body.batch_id), pb.StateResponse)

        return await self._unary(context, work)

    async def LoadWeights(self, request: pb.WeightsRequest, context) -> pb.WeightsResponse:
        async def work():
            body = from_message(request, WeightsRequest)
            return to_message(await self.service.load_weights(body.path, body.version), pb.WeightsResponse)

        return await self._unary(context, work)

    async def LoadCriticWeights(self, request: pb.CriticWeightsRequest, context) -> pb.CriticWeightsResponse:
        async def work():
            body = from_message(request, CriticWeightsRequest)
            answer = await self.service.load_critic_weights(body.path, body.version)
            return to_message(answer, pb.CriticWeightsResponse)

        return await self._unary(context, work)

    async def UploadWeights(self, requests: AsyncIterator[pb.UploadChunk], context) -> pb.WeightsResponse:
        return await self._upload("policy", requests, context, pb.WeightsResponse)

    async def UploadCriticWeights(
        self, requests: AsyncIterator[pb.UploadChunk], context
    ) -> pb.CriticWeightsResponse:
        return await self._upload("critic", requests, context, pb.CriticWeightsResponse)

    async def _upload(
        self, what: str, requests: AsyncIterator[pb.UploadChunk], context, answer: type
    ) -> Message:
        async def work() -> Message:
            target = self.uploads.get(what)
            if target is None:
                raise InvalidRequest(f"this server takes no {what} uploads", "open")
            return to_message(await upload_from_messages(target, requests), answer)

        return await self._unary(context, work)

    async def Info(self, request: empty_pb2.Empty, context) -> pb.InfoResponse:
        async def work():
            return to_message(self.service.info(), pb.InfoResponse)

        return await self._unary(context, work)

    async def OpenRun(self, request: pb.RunRequest, context) -> pb.RunResponse:
        async def work():
            return to_message(self.service.open_run(from_message(request, RunRequest)), pb.RunResponse)

        return await self._unary(context, work)

    async def GetRun(self, request: pb.RunRequest, context) -> pb.RunResponse:
        async def work():
            return to_message(self.service.run(_run_id(from_message(request, RunRequest))), pb.RunResponse)

        return await self._unary(context, work)

    async def CloseRun(self, request: pb.RunRequest, context) -> pb.RunResponse:
        async def work():
            run_id = _run_id(from_message(request, RunRequest))
            return to_message(await self.service.close_run(run_id), pb.RunResponse)

        return await self._unary(context, work)


async def upload_from_messages(target: UploadTarget, requests: AsyncIterator[pb.UploadChunk]) -> Any:
    """An upload from its stream of messages (espo.proto, UploadWeights): open, the shards, commit.
    Whatever fails, the upload is abandoned (it may be already)."""
    messages = aiter(requests)
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "open":
        raise InvalidRequest("an upload's first message is `open`", "open")
    upload_id = (await target.open(from_message(first.open, UploadRequest))).upload_id
    try:
        message = await anext(messages, None)
        while message is not None and message.WhichOneof("part") == "shard":
            shard, following = message.shard, []

            async def body(shard: pb.ShardChunk = shard, following: list = following) -> AsyncIterator[bytes]:
                yield shard.data
                async for part in messages:
                    if part.WhichOneof("part") != "shard" or part.shard.name not in ("", shard.name):
                        following.append(part)  # the next shard, or the commit
                        return
                    yield part.shard.data
                following.append(None)

            try:
                digest = bytes.fromhex(shard.sha256)
            except ValueError:
                raise InvalidRequest(f"shard {shard.name}: sha256 must be 64 hex digits", "sha256") from None
            size = shard.size if shard.HasField("size") else None
            await target.receive(upload_id, shard.name, body(), sha256=digest, length=size)
            message = following[0] if following else await anext(messages, None)
        if message is None or message.WhichOneof("part") != "commit":
            raise InvalidRequest("the upload's stream ended without `commit`: nothing was loaded", "commit")
        return await target.commit(upload_id, from_message(message.commit, UploadCommitRequest))
    except BaseException:
        with contextlib.suppress(Exception):
            await target.abandon(upload_id)
        raise


def _run_id(body: RunRequest) -> str:
    if body.run_id is None:
        raise InvalidRequest("run_id: which run?", "run_id")
    return body.run_id


@contextlib.asynccontextmanager
async def grpc_server(
    service: RolloutService, config: ServerConfig, uploads: dict[str, UploadTarget] | None = None
) -> AsyncIterator[int | None]:
    """Serve gRPC on `config.grpc_port` (same host) in this event loop while inside; yields the bound
    port (None when gRPC is off). Stops with a grace period for running calls on exit."""
    if config.grpc_port is None:
        yield None
        return
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    )
    pb_grpc.add_RolloutsServicer_to_server(RolloutsServicer(service, config, uploads), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = server.add_insecure_port(f"{host}:{config.grpc_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC to {config.host}:{config.grpc_port}")
    await server.start()
    log.info("gRPC (espo.v1.Rollouts) on %s:%d", config.host, port)
    try:
        yield port
    finally:
        await server.stop(grace=5)
