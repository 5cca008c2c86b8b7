"""HTTP routes that hand out the weights a server serves, file by file: what a replica that joins
warm (`--join`, join.py) copies, with no disk shared between the two.

    GET {prefix}            -> WeightFilesResponse: the version serving, each file's name, size, SHA-256
    GET {prefix}/{name}     -> the file's bytes (application/octet-stream, streamed)

with {prefix} `/v1/weights/files` (the policy) or `/v1/critic/weights/files` (an in-process critic;
a remote critic server is shared by the replicas, there is nothing to copy). The files are those
a push reads: the `*.safetensors` shards and `config.json` of the directory the weights were loaded
from, whether it came by path, by upload or is the model the server started with. They are admin
routes (on `--admin-port` only, when set): they give the learner's weights away, as the pushes take
them in. A server that is itself joining, or failed to, answers 503: it is no peer to join yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from espo_client.protocol import WeightFile, WeightFilesResponse

from .critic_engine import InProcessCritic
from .errors import InvalidRequest, NotFound, ServiceError
from .service import RolloutService
from .uploads import SHARD_NAME

CONFIG_FILE = "config.json"
_HASH_CHUNK = 1 << 20
_HASHES_KEPT = 1024
_hashes: dict[tuple[str, int, int], str] = {}
"""SHA-256 by (file, size, mtime): a checkpoint is hashed once, not on every listing."""
_hashing = threading.Lock()

Source = Callable[[RolloutService], tuple[str, int]]
"""The directory the weights of one model were loaded from, and the version they serve as."""


def policy_source(service: RolloutService) -> tuple[str, int]:
    return service.engine.weights_path, service.engine.policy_version


def critic_source(service: RolloutService) -> tuple[str, int]:
    critic = service.critic
    if not isinstance(critic, InProcessCritic):
        raise InvalidRequest(
            "this server has no in-process critic: a remote critic is shared by the replicas (nothing to "
            "copy), and a server without a critic has none",
            "name",
        )
    return critic.weights_dir, critic.version or 0


def is_weight_file(name: str) -> bool:
    """A name a checkpoint's file may have here: a shard (uploads.SHARD_NAME) or config.json."""
    return name == CONFIG_FILE or SHARD_NAME.fullmatch(name) is not None


def weight_files(directory: Path) -> list[Path]:
    """The files of the checkpoint in `directory` that a push reads, by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and is_weight_file(p.name))


def sha256_of(file: Path) -> str:
    """The file's SHA-256, computed once per (file, size, mtime). One file is hashed at a time: replicas
    that list the same new checkpoint together (a scale-up) wait for the first one's digests instead
    of each reading every shard again (a 7B checkpoint is 15 GB)."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hashing:
        if key not in _hashes:
            if len(_hashes) >= _HASHES_KEPT:  # those of weights long replaced
                _hashes.clear()
            _hashes[key] = _digest(file)
        return _hashes[key]


def _digest(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(directory: Path, version: int) -> WeightFilesResponse:
    files = [
        WeightFile(name=f.name, size=f.stat().st_size, sha256=sha256_of(f)) for f in weight_files(directory)
    ]
    return WeightFilesResponse(version=version, files=files)


def served_directory(service: RolloutService, source: Source, what: str) -> tuple[Path, int]:
    """The local directory `what` serves from and its version; 503 while this server is joining."""
    join = service.admin.join
    if join is not None and not join.done:
        raise ServiceError(f"this server is not ready to be joined: {join.detail}")
    path, version = source(service)
    directory = Path(path)
    if not directory.is_dir():
        raise InvalidRequest(
            f"the {what} serves {path}, which is not a local directory: nothing to hand out", "name"
        )
    return directory, version


def weight_files_router(
    prefix: str, what: str, source: Source, dependencies: list, responses: dict
) -> APIRouter:
    """The two routes under `prefix`, for the weights of `what` ("policy" or "critic")."""
    router = APIRouter(prefix=prefix, dependencies=dependencies, responses=responses, tags=["weights"])

    @router.get("", response_model=WeightFilesResponse, summary=f"The files of the {what} weights serving")
    async def list_files(request: Request) -> WeightFilesResponse:
        directory, version = served_directory(request.app.state.service, source, what)
        return await asyncio.to_thread(describe, directory, version)

    @router.get(
        "/{name}",
        response_class=FileResponse,
        summary=f"Download one file of the {what} weights serving",
        responses={
            200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        },
    )
    async def download_file(name: str, request: Request) -> FileResponse:
        directory, _ = served_directory(request.app.state.service, source, what)
        file = directory / name
        if not is_weight_file(name) or not file.is_file():
            raise NotFound(f"{name} is not a file of the {what} weights serving ({directory.name})", "name")
        return FileResponse(file, media_type="application/octet-stream", filename=name)

    return router
