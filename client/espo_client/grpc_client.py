"""`GrpcEspoClient`: the rollout server's gRPC API (`espo-server serve --grpc-port 50051`).

    from espo_client.grpc_client import GrpcEspoClient

    with GrpcEspoClient("127.0.0.1:50051") as client:
        for item in client.stream_rollouts(prompts=[{"text": "7+5="}], n=4, stop_rule="espo"):
            print(item)                   # Trajectory objects as they finish, then the RolloutResponse
        out = client.rollouts(prompts=[[5, 6, 14]], n=4, max_tokens=64)   # all at once
        client.upload_weights(model)      # the learner's weights, streamed (no shared file system)

The same protocol models as `EspoClient` (requests validated here first, answers validated on
arrival), over grpcio; needs the `grpc` extra (`pip install 'espo-client[grpc]'`). A failed call
raises `GrpcStatusError` with the gRPC `code`, the server's `message` and the offending field
(`param`) for INVALID_ARGUMENT. Every call has a deadline (`timeout`, seconds).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2

from ._core import trajectory_order
from ._exceptions import EspoError
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
    Prompt,
    RolloutRequest,
    RolloutResponse,
    StateResponse,
    Trajectory,
    UploadCommitRequest,
    UploadRequest,
    WeightsRequest,
    WeightsResponse,
)

__all__ = ["GrpcEspoClient", "GrpcStatusError"]

DEFAULT_GRPC_TIMEOUT = 900.0


class GrpcStatusError(EspoError):
    """A gRPC call ended with a non-OK status. `code` is the grpc.StatusCode; `param` the field the
    server named (INVALID_ARGUMENT), `type` the server's error type."""

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        super().__init__(f"{code.name}: {details}")
        trailing = dict(error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else {}
        self.code: grpc.StatusCode = code
        self.details: str = details or ""
        self.param: str | None = trailing.get("espo-error-param")
        self.type: str | None = trailing.get("espo-error-type")


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

    def upload_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> WeightsResponse:
        """Push the policy's weights over the gRPC stream (see `EspoClient.upload_weights`)."""
        messages = upload_messages(weights, version=version, config=config, shard_bytes=shard_bytes)
        return from_message(self._call(self._stub.UploadWeights, messages), WeightsResponse)

    def upload_critic_weights(
        self,
        weights: Any,
        *,
        version: int | None = None,
        config: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> CriticWeightsResponse:
        messages = upload_messages(weights, version=version, config=config, shard_bytes=shard_bytes)
        return from_message(self._call(self._stub.UploadCriticWeights, messages), CriticWeightsResponse)

    def info(self) -> InfoResponse:
        return from_message(self._call(self._stub.Info, empty_pb2.Empty()), InfoResponse)


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
