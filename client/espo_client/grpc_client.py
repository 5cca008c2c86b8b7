"""`GrpcEspoClient`: the rollout server's gRPC API (`espo-server serve --grpc-port 50051`).

    from espo_client.grpc_client import GrpcEspoClient

    with GrpcEspoClient("127.0.0.1:50051") as client:
        for item in client.stream_rollouts(prompts=[{"text": "7+5="}], n=4, stop_rule="espo"):
            print(item)                   # Trajectory objects as they finish, then the RolloutResponse
        out = client.rollouts(prompts=[[5, 6, 14]], n=4, max_tokens=64)   # all at once
        client.upload_weights(model)      # the learner's weights, streamed (no shared file system)

The same protocol models and the same behaviour as `EspoClient` (requests validated here first,
answers validated on arrival), over grpcio; needs the `grpc` extra (`pip install 'espo-client[grpc]'`):

* Errors: a failed call raises a `GrpcStatusError` that is also the HTTP client's class for the
  status its gRPC code stands for (`GRPC_HTTP_STATUS`): INVALID_ARGUMENT is a `BadRequestError`
  (`param` names the field), FAILED_PRECONDITION and ALREADY_EXISTS a `ConflictError`,
  RESOURCE_EXHAUSTED a `RateLimitError`, UNAVAILABLE a `ServiceUnavailableError`, so the same
  `except` clauses serve both clients. `code` is the grpc.StatusCode, `status_code` the HTTP status.
* Retries: RESOURCE_EXHAUSTED and UNAVAILABLE (which is also what a refused connection gives) are
  retried up to `max_retries` times in all, waiting `backoff * 2**attempt` seconds (jittered to
  50-100%), at least the server's `espo-retry-after-s` trailing metadata when it sends one, at
  most `backoff_max`. A streamed rollout is retried only before its first event. Every rollout
  call carries a `request_id` (a fresh uuid unless the caller set one), the same in every retry.
* Every attempt has a deadline (`timeout`, seconds).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from ._core import DEFAULT_MAX_RETRIES, retry_delay, rollout_request, trajectory_order
from ._exceptions import (
    RETRIED_STATUS_ERRORS,
    APIStatusError,
    BadRequestError,
    ConflictError,
    EspoError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    retry_after_seconds,
    status_error_class,
)
from ._uploads import hf_config
from .checkpoint import DEFAULT_SHARD_BYTES, shards
from .grpc_codec import from_message, to_message
from .proto import espo_pb2 as pb
from .proto import espo_pb2_grpc as pb_grpc
from .protocol import (
    CommitRequest,
    CriticWeightsRequest,
    CriticWeightsResponse,
    EspoState,
    GroupEvent,
    InfoResponse,
    RolloutRequest,
    RolloutResponse,
    RunRequest,
    RunResponse,
    StateResponse,
    Trajectory,
    UploadCommitRequest,
    UploadRequest,
    WeightsRequest,
    WeightsResponse,
)

__all__ = [
    "GRPC_HTTP_STATUS",
    "GrpcBadRequestError",
    "GrpcConflictError",
    "GrpcEspoClient",
    "GrpcRateLimitError",
    "GrpcServerError",
    "GrpcServiceUnavailableError",
    "GrpcStatusError",
    "grpc_status_error",
]

logger = logging.getLogger("espo_client")

DEFAULT_GRPC_TIMEOUT = 900.0
RETRY_AFTER_KEY = "espo-retry-after-s"
"""Trailing metadata of a RESOURCE_EXHAUSTED (or UNAVAILABLE) answer: seconds to wait before a retry."""

_C = grpc.StatusCode
GRPC_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    _C.INVALID_ARGUMENT: 400,
    _C.OUT_OF_RANGE: 400,
    _C.UNAUTHENTICATED: 401,
    _C.PERMISSION_DENIED: 403,
    _C.NOT_FOUND: 404,
    _C.FAILED_PRECONDITION: 409,  # the server's Conflict: a request_id reused, a busy run or batch
    _C.ALREADY_EXISTS: 409,
    _C.ABORTED: 409,
    _C.RESOURCE_EXHAUSTED: 429,  # the server's Overloaded
    _C.CANCELLED: 499,
    _C.UNIMPLEMENTED: 501,
    _C.UNAVAILABLE: 503,
    _C.DEADLINE_EXCEEDED: 504,
}
"""gRPC status code -> the HTTP status of the same meaning (any other code: 500)."""

_T = TypeVar("_T")


class GrpcStatusError(APIStatusError):
    """A gRPC call ended with a non-OK status.

    `code` is the grpc.StatusCode and `details` its message; `status_code` the HTTP status it
    stands for; `param` the field the server named (INVALID_ARGUMENT), `type` the server's error
    type, `retry_after` its `espo-retry-after-s` (all from the trailing metadata). Raised as one of
    the subclasses below, each also the HTTP client's class for that status (`grpc_status_error`).
    """

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        trailing = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
        super().__init__(
            details,
            response=None,
            status_code=GRPC_HTTP_STATUS.get(code, 500),
            type=trailing.get("espo-error-type"),
            param=trailing.get("espo-error-param"),
            code=code,
            retry_after=retry_after_seconds(trailing.get(RETRY_AFTER_KEY)),
        )
        self.args = (f"{code.name}: {details}",)
        self.code: grpc.StatusCode = code
        self.details: str = details

    @property
    def retry_after_s(self) -> float | None:
        """`retry_after` under the name the server's errors use."""
        return self.retry_after


class GrpcBadRequestError(GrpcStatusError, BadRequestError):
    """INVALID_ARGUMENT, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, CANCELLED."""


class GrpcConflictError(GrpcStatusError, ConflictError):
    """FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED: the server's 409 (`ConflictError`)."""


class GrpcRateLimitError(GrpcStatusError, RateLimitError):
    """RESOURCE_EXHAUSTED: the server's 429 (`RateLimitError`), retried after `retry_after`."""


class GrpcServiceUnavailableError(GrpcStatusError, ServiceUnavailableError):
    """UNAVAILABLE: the server's 503, or no server reached (`ServiceUnavailableError`), retried."""


class GrpcServerError(GrpcStatusError, ServerError):
    """INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...: any other failure (`ServerError`)."""


_GRPC_CLASSES: dict[type[APIStatusError], type[GrpcStatusError]] = {
    BadRequestError: GrpcBadRequestError,
    ConflictError: GrpcConflictError,
    RateLimitError: GrpcRateLimitError,
    ServiceUnavailableError: GrpcServiceUnavailableError,
    ServerError: GrpcServerError,
}


def grpc_status_error(error: grpc.RpcError) -> GrpcStatusError:
    """Our exception for a failed gRPC call (the caller raises it `from error`): the GrpcStatusError
    subclass that is also the HTTP client's class for the status the gRPC code stands for."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    base = status_error_class(GRPC_HTTP_STATUS.get(code, 500))
    return _GRPC_CLASSES.get(base, GrpcServerError)(error)


class GrpcEspoClient:
    """A synchronous client of `espo.v1.Rollouts`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_GRPC_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        """
        Args:
            target: the server's gRPC address, host:port.
            api_key: sent as `authorization: Bearer <api_key>` metadata.
            timeout: deadline of each attempt, seconds.
            max_retries: retries after RESOURCE_EXHAUSTED or UNAVAILABLE, all counted together.
            backoff: first retry waits about `backoff` seconds, then doubling (jittered).
            backoff_max: cap of one wait (also of a longer `espo-retry-after-s`).
            channel: a grpc.Channel to use instead of an insecure one to `target`.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0")
        self.target = target
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        self._stub = pb_grpc.RolloutsStub(self._channel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r})"

    def __enter__(self) -> GrpcEspoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def request(request: RolloutRequest | None = None, **fields: Any) -> RolloutRequest:
        """A RolloutRequest from keyword fields (prompts as token-id lists, texts, dicts or Prompt),
        or `request` updated with them; with a `request_id` (a fresh uuid unless one is set)."""
        if request is not None and fields:
            request = request.model_copy(update=fields)
        return rollout_request(request, {} if request is not None else fields)

    def stream_rollouts(
        self, request: RolloutRequest | None = None, **fields: Any
    ) -> Iterator[Trajectory | GroupEvent | RolloutResponse]:
        """Trajectories as they finish, a GroupEvent after the last trajectory of each complete
        prompt group, then the RolloutResponse (its `trajectories` empty). Closing the iterator
        early cancels the call (the server aborts the samples). Retried (same request_id) only
        until the first event has come."""
        body = self.request(request, **fields)
        message = to_message(body, pb.RolloutRequest)
        try:
            for attempt in itertools.count():
                stream = self._stub.Rollouts(message, timeout=self.timeout, metadata=self._metadata)
                try:
                    events = iter(stream)
                    try:
                        first = next(events)
                    except StopIteration:
                        raise EspoError("the gRPC stream ended without its done event") from None
                    except grpc.RpcError as exc:
                        self._backoff(attempt, exc)
                        continue
                    for event in itertools.chain([first], events):
                        yield _event(event)
                    return
                except grpc.RpcError as exc:
                    raise grpc_status_error(exc) from exc
                finally:
                    stream.cancel()
        except EspoError as exc:
            exc.request_id = body.request_id
            raise

    def rollouts(self, request: RolloutRequest | None = None, **fields: Any) -> RolloutResponse:
        """The whole call: the RolloutResponse with every trajectory, in (prompt, sample) order."""
        trajectories: list[Trajectory] = []
        response: RolloutResponse | None = None
        for item in self.stream_rollouts(request, **fields):
            if isinstance(item, Trajectory):
                trajectories.append(item)
            elif isinstance(item, RolloutResponse):
                response = item
        if response is None:
            raise EspoError("the gRPC stream ended without its done event")
        trajectories.sort(key=trajectory_order)
        return response.model_copy(update={"trajectories": trajectories})

    def state(self) -> StateResponse:
        return self._call(self._stub.GetState, empty_pb2.Empty(), StateResponse)

    def set_state(self, state: EspoState) -> StateResponse:
        return self._call(self._stub.SetState, to_message(state, pb.EspoState), StateResponse)

    def commit(self, batch_id: str | None = None) -> StateResponse:
        message = to_message(CommitRequest(batch_id=batch_id), pb.CommitRequest)
        return self._call(self._stub.Commit, message, StateResponse)

    def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        message = to_message(WeightsRequest(path=path, version=version), pb.WeightsRequest)
        return self._call(self._stub.LoadWeights, message, WeightsResponse)

    def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        message = to_message(CriticWeightsRequest(path=path, version=version), pb.CriticWeightsRequest)
        return self._call(self._stub.LoadCriticWeights, message, CriticWeightsResponse)

    def open_run(self, run_id: str | None = None) -> RunResponse:
        """OpenRun: open a run, which carries unfinished groups from one call to the next
        (`rollouts(..., run_id=..., return_groups=B, leftover="carry")`); see `EspoClient.open_run`."""
        return self._run_call(self._stub.OpenRun, run_id)

    def describe_run(self, run_id: str) -> RunResponse:
        """GetRun: what the run carries."""
        return self._run_call(self._stub.GetRun, run_id)

    def close_run(self, run_id: str) -> RunResponse:
        """CloseRun: close the run; the samples it carries are aborted."""
        return self._run_call(self._stub.CloseRun, run_id)

    def upload_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> WeightsResponse:
        """UploadWeights: push the policy's weights over one client-streaming call (see
        `EspoClient.upload_weights`). Not retried: the stream is made as it is sent."""
        messages = upload_messages(weights, version=version, config=config, shard_bytes=shard_bytes)
        return self._upload(self._stub.UploadWeights, messages, WeightsResponse)

    def upload_critic_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> CriticWeightsResponse:
        """UploadCriticWeights: `upload_weights` for the critic."""
        messages = upload_messages(weights, version=version, config=config, shard_bytes=shard_bytes)
        return self._upload(self._stub.UploadCriticWeights, messages, CriticWeightsResponse)

    def info(self) -> InfoResponse:
        return self._call(self._stub.Info, empty_pb2.Empty(), InfoResponse)

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, method: Callable[..., Message], message: Message, model: type[_T]) -> _T:
        """A unary call, retried as the module docstring says; its answer as `model`."""
        for attempt in itertools.count():
            try:
                answer = method(message, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                self._backoff(attempt, exc)
                continue
            return from_message(answer, model)
        raise AssertionError("not reached")

    def _upload(self, method: Callable[..., Message], messages: Iterator[Message], model: type[_T]) -> _T:
        """A client-streaming call, once (its messages are made as they are sent)."""
        try:
            answer = method(messages, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_status_error(exc) from exc
        return from_message(answer, model)

    def _run_call(self, method: Callable[..., Message], run_id: str | None) -> RunResponse:
        return self._call(method, to_message(RunRequest(run_id=run_id), pb.RunRequest), RunResponse)

    def _backoff(self, attempt: int, exc: grpc.RpcError) -> None:
        """Wait before retrying a failed attempt, or raise its error if it is not retried (or the
        retries are spent)."""
        error = grpc_status_error(exc)
        if not (isinstance(error, RETRIED_STATUS_ERRORS) and attempt < self.max_retries):
            raise error from exc
        delay = retry_delay(attempt, error.retry_after, self.backoff, self.backoff_max)
        logger.warning(
            "%s: %s; retry %d/%d in %.2fs", self.target, error, attempt + 1, self.max_retries, delay
        )
        time.sleep(delay)


def _event(event: pb.RolloutEvent) -> Trajectory | GroupEvent | RolloutResponse:
    if event.HasField("trajectory"):
        return from_message(event.trajectory, Trajectory)
    if event.HasField("group"):
        return from_message(event.group, GroupEvent)
    return from_message(event.done, RolloutResponse)


GRPC_CHUNK_BYTES = 4 << 20
"""Bytes of a shard per message (the server takes messages of up to 64 MiB)."""


def upload_messages(
    weights: Any,
    *,
    version: int | None,
    config: Mapping[str, Any] | None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Iterator[pb.UploadChunk]:
    """An upload's stream (espo.proto, UploadWeights): open, each shard's bytes, commit; the shards
    are made as the stream is read (gRPC reads it on its own thread)."""
    request = UploadRequest(config=hf_config(weights) if config is None else dict(config))
    yield pb.UploadChunk(open=to_message(request, pb.UploadRequest))
    for shard in shards(weights, shard_bytes=shard_bytes):
        first = pb.ShardChunk(name=shard.name, sha256=shard.sha256.hex(), size=shard.size)
        for k, chunk in enumerate(shard.chunks(GRPC_CHUNK_BYTES)):
            message = first if k == 0 else pb.ShardChunk(name=shard.name)
            message.data = bytes(chunk)
            yield pb.UploadChunk(shard=message)
    commit = to_message(UploadCommitRequest(version=version), pb.UploadCommitRequest)
    yield pb.UploadChunk(commit=commit)
