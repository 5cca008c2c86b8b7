"""HTTP routes of weight uploads: the rollout server's (policy and critic) and the critic server's.

    POST   {prefix}                              UploadRequest -> 201 UploadResponse (one open at a time)
    GET    {prefix}/{upload_id}                  -> UploadResponse
    PUT    {prefix}/{upload_id}/shards/{shard}   the shard's bytes (application/octet-stream, streamed),
                                                 `Content-Digest: sha-256=:<base64>:` -> UploadResponse
    POST   {prefix}/{upload_id}/commit           UploadCommitRequest -> the push's answer
    DELETE {prefix}/{upload_id}                  -> UploadResponse (abandoned)

with {prefix} `/v1/weights/uploads` (the policy) or `/v1/critic/weights/uploads`. The handlers only
translate: an `UploadTarget` does the work (upload_targets.LocalUploads here, upload_forward for a critic
on another machine), and the gRPC API calls the same targets.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from espo_client.protocol import UploadCommitRequest, UploadRequest, UploadResponse

from .errors import InvalidRequest
from .uploads import UploadTarget

SHARD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The shard: one safetensors file, streamed.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "parameters": [
        {
            "name": "Content-Digest",
            "in": "header",
            "required": True,
            "description": "The shard's SHA-256 (RFC 9530): `sha-256=:<base64 of the 32-byte digest>:`",
            "schema": {"type": "string"},
        }
    ],
}


def parse_content_digest(value: str | None) -> bytes:
    """`sha-256=:<base64>:` (RFC 9530; other algorithms may be listed too) -> the 32-byte digest."""
    for item in (value or "").split(","):
        algorithm, _, encoded = item.strip().partition("=")
        if algorithm.strip().lower() != "sha-256":
            continue
        try:
            digest = base64.b64decode(encoded.strip().strip(":"), validate=True)
        except (binascii.Error, ValueError):
            break
        if len(digest) == 32:
            return digest
        break
    raise InvalidRequest(
        "Content-Digest: every shard needs its SHA-256, as `Content-Digest: sha-256=:<base64>:`",
        "Content-Digest",
    )


def content_digest(digest: bytes) -> str:
    return f"sha-256=:{base64.b64encode(digest).decode()}:"


def state_target(what: str) -> Callable[[Request], UploadTarget[Any]]:
    """The upload target of `what` the serving app holds (`app.state.uploads`, set at start-up);
    InvalidRequest where there is none (a critic that takes no pushes)."""

    def target(request: Request) -> UploadTarget[Any]:
        found = getattr(request.app.state, "uploads", {}).get(what)
        if found is None:
            raise InvalidRequest(
                f"this server takes no {what} uploads (a critic must be in-process or "
                "`--critic remote` to take pushes)",
                "upload_id",
            )
        return found

    return target


def upload_router(
    prefix: str,
    what: str,
    target_of: Callable[[Request], UploadTarget[Any]],
    commit_model: type,
    dependencies: list,
    responses: dict,
) -> APIRouter:
    """The five routes under `prefix`, for uploads of `what` ("policy" or "critic")."""
    router = APIRouter(prefix=prefix, dependencies=dependencies, responses=responses, tags=["weights"])

    @router.post("", response_model=UploadResponse, status_code=201, summary=f"Open a {what} upload")
    async def open_upload(body: UploadRequest, request: Request) -> UploadResponse:
        return await target_of(request).open(body)

    @router.get("/{upload_id}", response_model=UploadResponse, summary=f"Where a {what} upload stands")
    async def upload_status(upload_id: str, request: Request) -> UploadResponse:
        return await target_of(request).status(upload_id)

    @router.put(
        "/{upload_id}/shards/{shard}",
        response_model=UploadResponse,
        summary=f"Stream one shard of a {what} upload",
        openapi_extra=SHARD_BODY,
    )
    async def upload_shard(upload_id: str, shard: str, request: Request) -> UploadResponse:
        target = target_of(request)
        digest = parse_content_digest(request.headers.get("content-digest"))
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise InvalidRequest(f"Content-Length: {length!r} is not a byte count", "Content-Length")
        return await target.receive(
            upload_id, shard, request.stream(), sha256=digest, length=int(length) if length else None
        )

    @router.post(
        "/{upload_id}/commit", response_model=commit_model, summary=f"Check and serve a {what} upload"
    )
    async def commit_upload(upload_id: str, body: UploadCommitRequest, request: Request) -> Any:
        return await target_of(request).commit(upload_id, body)

    @router.delete("/{upload_id}", response_model=UploadResponse, summary=f"Abandon a {what} upload")
    async def abandon_upload(upload_id: str, request: Request) -> UploadResponse:
        return await target_of(request).abandon(upload_id)

    return router
