"""`GrpcEspoClient`: the rollout server's gRPC API (`espo-server serve --grpc-port 50051`).

    from espo_client.grpc_client import GrpcEspoClient

    with GrpcEspoClient("127.0.0.1:50051") as client:
        for item in client.stream_rollouts(prompts=[{"text": "7+5="}], n=4, stop_rule="espo"):
            print(item)                   # Trajectory objects as they finish, then the RolloutResponse
        out = client.rollouts(prompts=[[5, 6, 14]], n=4, max_tokens=64)   # all at once

The same protocol models as `EspoClient` (requests validated here first, answers validated on
arrival), over grpcio; needs the `grpc` extra (`pip install 'espo-client[grpc]'`). A failed call
raises `GrpcStatusError` with the gRPC `code`, the server's `message` and the offending field
(`param`) for INVALID_ARGUMENT. Every call has a deadline (`timeout`, seconds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2

from ._core import trajectory_order
from ._exceptions import EspoError
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
    Prompt,
    RolloutRequest,
    RolloutResponse,
    StateResponse,
    Trajectory,
    WeightsRequest,
    WeightsResponse,
)

__all__ = ["GrpcEspoClient", "GrpcStatusError"]

DEFAULT_GRPC_TIMEOUT = 900.0


class GrpcStatusError(EspoError):
    """A gRPC call ended with a non-OK status. `code` is the grpc.StatusCode; `param` the field the
    server named (INVALID_ARGUMENT), `type` the server's error type, `retry_after_s` the seconds the
    server asks to wait before a retry (too much in flight, or shutting down), if it said."""

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        super().__init__(f"{code.name}: {details}")
        trailing = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
        self.code: grpc.StatusCode = code
        self.details: str = details or ""
        self.param: str | None = trailing.get("espo-error-param")
        self.type: str | None = trailing.get("espo-error-type")
        retry_after = trailing.get("espo-retry-after-s")
        self.retry_after_s: float | None = None if retry_after is None else float(retry_after)


def _prompt(p: Prompt | dict | Sequence[int] | str) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(text=p)
    if isinstance(p, dict):
        return Prompt.model_validate(p)
    return Prompt(token_ids=list(p))


class GrpcEspoClient:
    """A synchronous client of `espo.v1.Rollouts`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_GRPC_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        self._stub = pb_grpc.RolloutsStub(self._channel)

    def __enter__(self) -> GrpcEspoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, message) -> Any:
        try:
            return method(message, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise GrpcStatusError(exc) from exc

    @staticmethod
    def request(request: RolloutRequest | None = None, **fields: Any) -> RolloutRequest:
        """A RolloutRequest from keyword fields (prompts as token-id lists, texts, dicts or Prompt)."""
        if request is not None:
            return request.model_copy(update=fields) if fields else request
        if "prompts" in fields:
            fields["prompts"] = [_prompt(p) for p in fields["prompts"]]
        return RolloutRequest.model_validate(fields)

    def stream_rollouts(
        self, request: RolloutRequest | None = None, **fields: Any
    ) -> Iterator[Trajectory | GroupEvent | RolloutResponse]:
        """Trajectories as they finish, a GroupEvent after the last trajectory of each complete
        prompt group, then the RolloutResponse (its `trajectories` empty). Closing the iterator
        early cancels the call (the server aborts the samples)."""
        body = self.request(request, **fields)
        stream = self._stub.Rollouts(
            to_message(body, pb.RolloutRequest), timeout=self.timeout, metadata=self._metadata
        )
        try:
            for event in stream:
                if event.HasField("trajectory"):
                    yield from_message(event.trajectory, Trajectory)
                elif event.HasField("group"):
                    yield from_message(event.group, GroupEvent)
                else:
                    yield from_message(event.done, RolloutResponse)
        except grpc.RpcError as exc:
            raise GrpcStatusError(exc) from exc
        finally:
            stream.cancel()

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
        return from_message(self._call(self._stub.GetState, empty_pb2.Empty()), StateResponse)

    def set_state(self, state: EspoState) -> StateResponse:
        return from_message(self._call(self._stub.SetState, to_message(state, pb.EspoState)), StateResponse)

    def commit(self, batch_id: str | None = None) -> StateResponse:
        message = to_message(CommitRequest(batch_id=batch_id), pb.CommitRequest)
        return from_message(self._call(self._stub.Commit, message), StateResponse)

    def load_weights(self, path: str, version: int | None = None) -> WeightsResponse:
        message = to_message(WeightsRequest(path=path, version=version), pb.WeightsRequest)
        return from_message(self._call(self._stub.LoadWeights, message), WeightsResponse)

    def load_critic_weights(self, path: str, version: int | None = None) -> CriticWeightsResponse:
        message = to_message(CriticWeightsRequest(path=path, version=version), pb.CriticWeightsRequest)
        return from_message(self._call(self._stub.LoadCriticWeights, message), CriticWeightsResponse)

    def info(self) -> InfoResponse:
        return from_message(self._call(self._stub.Info, empty_pb2.Empty()), InfoResponse)
