"""Critic uploads relayed to the critic's own server (`--critic remote`, `espo-server critic`).

The learner talks to the rollout server only; a critic on another machine takes the upload there.
Each request is passed on as it comes (a shard's body is streamed through, never held), and the
critic server's answer comes back, its errors with their status and a word that the critic said
so. The commit runs inside `around_commit`: the rollout server's push gate, so that no rollout
call sees the critic change under it, exactly as a push of a path is forwarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Generic, TypeVar

import httpx

from espo_client.protocol import CriticWeightsResponse, UploadCommitRequest, UploadRequest, UploadResponse

from .critic import CriticError
from .errors import Conflict, Forbidden, InvalidRequest, NotFound, ServiceError, TooLarge
from .upload_routes import content_digest

R = TypeVar("R")
PREFIX = "/v1/critic/weights/uploads"
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0)
"""A commit waits for the critic's queries in flight and its reload; a shard may be large."""
_RELAYED: dict[int, type[ServiceError]] = {
    400: InvalidRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
}


class ForwardedUploads(Generic[R]):
    """The upload routes of the critic server at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        around_commit: Callable[[Callable[[], Awaitable[tuple[int, float]]]], Awaitable[R]],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._around_commit = around_commit
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=TIMEOUT,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            transport=transport,
        )

    async def open(self, request: UploadRequest) -> UploadResponse:
        body = request.model_dump_json(exclude_none=True)
        return UploadResponse.model_validate(await self._ask("POST", "", content=body, json_body=True))

    async def status(self, upload_id: str) -> UploadResponse:
        return UploadResponse.model_validate(await self._ask("GET", f"/{upload_id}"))

    async def receive(
        self, upload_id: str, shard: str, body: AsyncIterable[bytes], *, sha256: bytes, length: int | None
    ) -> UploadResponse:
        headers = {"Content-Digest": content_digest(sha256), "Content-Type": "application/octet-stream"}
        if length is not None:
            headers["Content-Length"] = str(length)
        answer = await self._ask("PUT", f"/{upload_id}/shards/{shard}", content=body, headers=headers)
        return UploadResponse.model_validate(answer)

    async def abandon(self, upload_id: str) -> UploadResponse:
        return UploadResponse.model_validate(await self._ask("DELETE", f"/{upload_id}"))

    async def commit(self, upload_id: str, request: UploadCommitRequest) -> R:
        async def load() -> tuple[int, float]:
            body = request.model_dump_json(exclude_none=True)
            answer = await self._ask("POST", f"/{upload_id}/commit", content=body, json_body=True)
            done = CriticWeightsResponse.model_validate(answer)
            return done.critic_version, done.load_time_s

        return await self._around_commit(load)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _ask(
        self,
        method: str,
        path: str,
        *,
        content: str | AsyncIterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        json_body: bool = False,
    ) -> dict:
        headers = dict(headers or {})
        if json_body:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(method, PREFIX + path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            message, param = str(error["message"]), error.get("param")
        except (ValueError, KeyError, TypeError):
            message, param = response.text[:200], None
        if response.status_code == 401:
            raise CriticError(f"critic at {self.base_url} refused our bearer token: set --critic-api-key")
        kind = _RELAYED.get(response.status_code, CriticError)
        raise kind(f"critic at {self.base_url}: {message}", param)
