"""Where a server's weight uploads go: one `UploadTarget` (uploads.py) per model, what the HTTP
routes (upload_routes.py) and the gRPC servicer call.

    LocalUploads        staged here by an `UploadStore` (uploads.py); a commit is the push of the
                        staged directory, as a push by path
    ForwardedUploads    relayed to a critic server on another machine (upload_forward.py)

`upload_targets` assembles a rollout server's: the policy's, and the critic's if its critic takes
pushes. `staging_root` is the directory of this process's own that they stage in.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from espo_client.protocol import UploadCommitRequest, UploadRequest, UploadResponse

from .config import ServerConfig
from .critic_engine import InProcessCritic
from .critic_http import EspoValuesCritic
from .upload_forward import ForwardedUploads
from .uploads import UploadStore

if TYPE_CHECKING:
    from .service import RolloutService

R = TypeVar("R")


class LocalUploads(Generic[R]):
    """Uploads staged here; a commit calls `push(directory, version)`, the push of a path."""

    def __init__(self, store: UploadStore, push: Callable[[Path, int | None], Awaitable[R]]) -> None:
        self.store = store
        self._push = push

    async def open(self, request: UploadRequest) -> UploadResponse:
        return self.store.open(request)

    async def status(self, upload_id: str) -> UploadResponse:
        return self.store.status(upload_id)

    async def receive(
        self, upload_id: str, shard: str, body: AsyncIterable[bytes], *, sha256: bytes, length: int | None
    ) -> UploadResponse:
        return await self.store.receive(upload_id, shard, body, sha256=sha256, length=length)

    async def abandon(self, upload_id: str) -> UploadResponse:
        return self.store.abandon(upload_id)

    async def commit(self, upload_id: str, request: UploadCommitRequest) -> R:
        return await self.store.commit(upload_id, lambda directory: self._push(directory, request.version))

    async def aclose(self) -> None:
        await self.store.aclose()


@contextlib.contextmanager
def staging_root(base: Path | None) -> Iterator[Path]:
    """A directory of this process's own for weight uploads (inside `base`), removed on exit."""
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="espo-uploads-", dir=base) as root:
        yield Path(root)


@contextlib.asynccontextmanager
async def upload_targets(service: RolloutService, config: ServerConfig) -> AsyncIterator[dict[str, Any]]:
    """Where weight uploads go: "policy" (staged here, then `serve_weights`), and "critic" if the
    critic takes pushes (an in-process one: staged here; `--critic remote`: relayed to its server)."""
    limits = {"max_bytes": config.upload_max_bytes, "idle_timeout_s": config.upload_idle_timeout_s}
    engine, critic = service.engine, service.critic
    with staging_root(config.upload_dir) as root:
        store = UploadStore(
            root / "policy",
            what="policy",
            reference=engine.model,
            in_use=lambda: engine.weights_path,
            **limits,
        )
        targets: dict[str, Any] = {"policy": LocalUploads(store, service.serve_weights)}
        if isinstance(critic, InProcessCritic):
            critic_store = UploadStore(
                root / "critic",
                what="critic",
                reference=critic.model,
                in_use=lambda: critic.weights_dir,
                **limits,
            )
            targets["critic"] = LocalUploads(
                critic_store,
                lambda path, version: service.update_critic(lambda: critic.load_weights(str(path), version)),
            )
        elif isinstance(critic, EspoValuesCritic):
            remote = critic

            async def around_commit(load: Callable[[], Awaitable[tuple[int, float]]]) -> Any:
                async def load_and_note() -> tuple[int, float]:
                    remote.version, seconds = await load()
                    return remote.version, seconds

                return await service.update_critic(load_and_note)

            api_key = config.critic_api_key or config.api_key
            targets["critic"] = ForwardedUploads(
                critic.base_url, api_key=api_key, around_commit=around_commit
            )
        try:
            yield targets
        finally:
            for target in targets.values():
                await target.aclose()
