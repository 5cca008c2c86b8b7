"""Weight uploads as client operations (see `_core`): open, one PUT per shard, commit.

    POST   /v1/weights/uploads                         {"config": ...}   -> upload_id
    PUT    /v1/weights/uploads/{id}/shards/{name}      shard bytes, Content-Digest: sha-256=:...:
    POST   /v1/weights/uploads/{id}/commit             {"version": ...}  -> WeightsResponse
    DELETE /v1/weights/uploads/{id}                    (when anything failed on our side)

(`/v1/critic/weights/uploads` for the critic.) The shards are made from the tensors as the upload
goes (`checkpoint.shards`); each is streamed from the tensors' memory. PUTs and the commit are not
retried: the server abandons an upload whose shard failed, so a push that failed is pushed again.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from ._core import BaseClient, Op, UploadBody, _parse
from ._exceptions import EspoError
from .checkpoint import DEFAULT_SHARD_BYTES, Shard, shards
from .protocol import (
    CriticWeightsResponse,
    UploadCommitRequest,
    UploadRequest,
    UploadResponse,
    WeightsResponse,
)

__all__ = ["PREFIXES", "hf_config", "upload_op"]

PREFIXES = {"policy": "/v1/weights/uploads", "critic": "/v1/critic/weights/uploads"}
ANSWERS: dict[str, type[WeightsResponse] | type[CriticWeightsResponse]] = {
    "policy": WeightsResponse,
    "critic": CriticWeightsResponse,
}


def upload_op(
    client: BaseClient,
    target: str,
    weights: Any,
    *,
    version: int | None = None,
    config: dict[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Op[Any]:
    """The whole push: open, every shard of `weights`, commit; on a failure here, the upload is
    abandoned (DELETE, best effort) before the error is raised."""
    opened = yield from open_upload_op(client, target, hf_config(weights) if config is None else config)
    try:
        for shard in shards(weights, shard_bytes=shard_bytes):
            yield from put_shard_op(client, target, opened.upload_id, shard)
        return (yield from commit_upload_op(client, target, opened.upload_id, version))
    except Exception:
        try:
            yield from abandon_upload_op(client, target, opened.upload_id)
        except EspoError:
            pass  # the server ended it already (a bad shard, a failed commit) or is gone
        raise


def open_upload_op(client: BaseClient, target: str, config: dict[str, Any] | None) -> Op[UploadResponse]:
    return client._call("POST", PREFIXES[target], UploadResponse, UploadRequest(config=config))


def put_shard_op(client: BaseClient, target: str, upload_id: str, shard: Shard) -> Op[UploadResponse]:
    body = UploadBody(shard.chunks, shard_headers(shard))
    path = f"{PREFIXES[target]}/{upload_id}/shards/{shard.name}"
    response = yield from client._send("PUT", path, upload=body, retry=False)
    return _parse(UploadResponse, response)


def commit_upload_op(client: BaseClient, target: str, upload_id: str, version: int | None) -> Op[Any]:
    request = UploadCommitRequest(version=version)
    path = f"{PREFIXES[target]}/{upload_id}/commit"
    return (yield from client._call("POST", path, ANSWERS[target], request, retry=False))


def abandon_upload_op(client: BaseClient, target: str, upload_id: str) -> Op[UploadResponse]:
    return client._call("DELETE", f"{PREFIXES[target]}/{upload_id}", UploadResponse, retry=False)


def shard_headers(shard: Shard) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(shard.size),
        "Content-Digest": f"sha-256=:{base64.b64encode(shard.sha256).decode()}:",
    }


def hf_config(weights: Any) -> dict[str, Any] | None:
    """The config of a transformers model (`model.config.to_dict()`), for the server's check that
    the checkpoint is of the served architecture; None for anything else."""
    config = getattr(weights, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return None
    return json.loads(json.dumps(config.to_dict(), default=str))  # JSON-safe (dtypes, paths)
