"""Weight uploads: a checkpoint streamed over the wire into a staging directory this server owns.

A learner that shares no file system with the server pushes its weights as safetensors shards:

    open    (UploadRequest)      -> an upload id; one open upload per model (a second: 409)
    shard   (a streamed body)    -> checked as it arrives, written to the upload's directory
    commit  (version)            -> the directory goes through the push of a path: the same checks,
                                    the same gate, carried samples suspended, roll-back, version bump
    abandon, or idle expiry      -> the directory is deleted

A shard is one safetensors file, sent with its SHA-256. Its header is read before its data: every
tensor must be one of the served model's, of its shape and kind of dtype, not sent before, and the
shard must fit the upload's byte limit. Its data goes to disk in batches as it arrives (neither
side holds a checkpoint in memory), is hashed on the way, and must end exactly where the header
says. Anything wrong with a shard (its header, its length, its checksum, a client that went away,
the same shard twice, a commit that fails) abandons the whole upload: its directory is deleted,
the served weights are untouched, and the error names the shard and the problem. An upload with no
request for `idle_timeout_s` is abandoned the same way. After a commit the directory serves, and is
kept (a failed push later rolls back to it) until newer weights serve. No HTTP, no vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from espo_client.protocol import UploadCommitRequest, UploadRequest, UploadResponse

from .errors import Conflict, InvalidRequest, NotFound, ServiceError
from .upload_shard import check_tensors, receive_shard
from .weights import (
    TensorSpec,
    checkpoint_specs,
    config_problem,
    few,
    served_config,
    served_tied,
    tied_values_problem,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.safetensors")
"""What a shard may be called: a plain file name, no directories."""
DEFAULT_MAX_BYTES = 256 << 30
"""The byte limit when the served checkpoint's size is unknown (a hub name) and none was set."""
_FORGOTTEN = 64
"""How many ended uploads are remembered, to say why their id is gone."""


@dataclass
class Upload:
    upload_id: str
    directory: Path
    shards: list[str] = field(default_factory=list)
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    """Every tensor announced so far (by the headers of shards received or arriving)."""
    bytes_received: int = 0
    bytes_reserved: int = 0
    """Bytes of the shards arriving now (their headers say how many)."""
    arriving: set[str] = field(default_factory=set)
    state: str = "open"
    last_active: float = field(default_factory=time.monotonic)


class UploadStore:
    """The uploads of one model (the policy, or a critic), staged under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        what: str,
        reference: str | None,
        in_use: Callable[[], str | None],
        max_bytes: int | None = None,
        idle_timeout_s: float = 120.0,
    ) -> None:
        """
        Args:
            root: the staging directory (this store's own; created if missing).
            what: "policy" or "critic", for messages.
            reference: the served model's directory: the tensors and config an upload must match
                (None, or not a local directory: only the files' integrity is checked).
            max_bytes: most bytes one upload may hold (None: twice the served checkpoint's size
                plus 64 MiB, room for float32 weights of a bfloat16 checkpoint).
            idle_timeout_s: an upload with no request for this long is abandoned.
            in_use: the directory the served weights were loaded from (a committed upload's
                directory is deleted once another serves).
        """
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.what = what
        self.idle_timeout_s = idle_timeout_s
        self.in_use = in_use
        ref = Path(reference) if reference else None
        if ref is not None and not (ref.is_dir() and any(ref.glob("*.safetensors"))):
            ref = None  # a hub name: only the files' integrity can be checked
        self.expected: dict[str, TensorSpec] | None = checkpoint_specs(ref) if ref else None
        self.served_config = served_config(ref) if ref else None
        self.tied = served_tied(str(ref)) if ref else False
        if max_bytes is None:
            size = sum(f.stat().st_size for f in ref.glob("*.safetensors")) if ref else 0
            max_bytes = 2 * size + (64 << 20) if size else DEFAULT_MAX_BYTES
        self.max_bytes = max_bytes
        self._uploads: dict[str, Upload] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._serving: Path | None = None
        self._expiry: asyncio.Task[None] | None = None

    # --- the routes' operations -------------------------------------------------------------

    def open(self, request: UploadRequest) -> UploadResponse:
        """A new upload; Conflict (409) while another is open, InvalidRequest if its config says it
        is another model."""
        self.sweep()
        other = next(iter(self._uploads.values()), None)
        if other is not None:
            idle = time.monotonic() - other.last_active
            raise Conflict(
                f"a {self.what} upload is in progress ({other.upload_id}, {other.state}, idle {idle:.0f}s "
                f"of {self.idle_timeout_s:.0f}s): commit or delete it first",
                "upload_id",
            )
        if request.config is not None and self.served_config is not None:
            problem = config_problem(request.config, self.served_config)
            if problem:
                raise InvalidRequest(
                    f"config: not a checkpoint of the served {self.what}: {problem}", "config"
                )
        upload = Upload(uuid.uuid4().hex, self.root / f"upload-{uuid.uuid4().hex[:12]}")
        upload.directory.mkdir()
        if request.config is not None:  # the push's own checks read it beside the shards
            (upload.directory / "config.json").write_text(json.dumps(request.config))
        self._uploads[upload.upload_id] = upload
        self._start_expiry()
        log.info("%s upload %s opened", self.what, upload.upload_id)
        return self.describe(upload)

    def status(self, upload_id: str) -> UploadResponse:
        self.sweep()
        upload = self._get(upload_id)
        upload.last_active = time.monotonic()
        return self.describe(upload)

    async def receive(
        self, upload_id: str, shard: str, body: AsyncIterable[bytes], *, sha256: bytes, length: int | None
    ) -> UploadResponse:
        """Take one shard from `body` (its bytes as they arrive); `sha256` is its digest, `length`
        its size if the sender said. Any problem abandons the upload (see the module docstring)."""
        self.sweep()
        upload = self._get(upload_id)
        self._check_open(upload)
        try:
            if not SHARD_NAME.fullmatch(shard):
                raise InvalidRequest(
                    f"shard {shard!r}: a shard is named like model-00001.safetensors (letters, digits, "
                    "'.', '_', '-'; ending in .safetensors)",
                    "shard",
                )
            if shard in upload.shards or shard in upload.arriving:
                raise Conflict(f"shard {shard} was sent twice", "shard")
            if len(sha256) != 32:
                raise InvalidRequest("the shard's SHA-256 digest must be 32 bytes", "sha256")
        except ServiceError as exc:
            raise self._abandon(upload, exc) from None
        upload.arriving.add(shard)
        upload.last_active = time.monotonic()
        reserved = 0

        def check(specs: dict[str, TensorSpec], size: int) -> None:
            nonlocal reserved
            room = self.max_bytes - upload.bytes_received - upload.bytes_reserved
            check_tensors(
                shard, specs, size, sent=upload.tensors, expected=self.expected, room=room,
                limit=self.max_bytes, tied=self.tied,
            )  # fmt: skip
            upload.tensors.update(specs)
            upload.bytes_reserved += size
            reserved = size

        def still_wanted() -> bool:
            upload.last_active = time.monotonic()
            return upload.state == "open"

        try:
            _, size = await receive_shard(
                upload.directory, shard, aiter(body), sha256=sha256, length=length, check=check,
                still_wanted=still_wanted, idle_timeout_s=self.idle_timeout_s,
            )  # fmt: skip
            upload.shards.append(shard)
            upload.bytes_received += size
        except ServiceError as exc:
            raise self._abandon(upload, exc) from None
        except BaseException as exc:  # the client went away (the body failed), or we were cancelled
            reason = InvalidRequest(
                f"shard {shard}: its body could not be read to the end ({exc!r})", "shard"
            )
            self._abandon(upload, reason)
            if isinstance(exc, Exception):
                raise reason from exc
            raise
        finally:
            upload.arriving.discard(shard)
            upload.bytes_reserved -= reserved
            upload.last_active = time.monotonic()
        return self.describe(upload)

    async def commit(self, upload_id: str, push: Callable[[Path], Awaitable[R]]) -> R:
        """Serve the upload: `push(directory)` (the push of a path, with its checks) once every
        shard has arrived. On success the directory is kept while it serves; on failure deleted."""
        self.sweep()
        upload = self._get(upload_id)
        self._check_open(upload)
        if upload.arriving:
            raise Conflict(
                f"shards are still arriving ({sorted(upload.arriving)}): commit after them", "upload_id"
            )
        upload.state = "committing"  # no shard, delete or second commit gets in from here on
        try:
            problem = await asyncio.to_thread(self._incomplete, upload)
            if problem is not None:
                raise self._abandon(upload, problem)
            result = await push(upload.directory)
        except BaseException as exc:
            self._end(upload, f"its commit failed: {exc}")  # (done already if abandoned)
            raise
        self._end(upload, "committed", keep=True)
        previous, self._serving = self._serving, upload.directory
        if previous is not None:
            _remove(previous)
        return result

    def adopt(self, directory: Path) -> None:
        """`directory` (inside `root`, not an upload: a join's copy) serves now: it is deleted like
        a committed upload's once other weights serve."""
        previous, self._serving = self._serving, Path(directory)
        if previous is not None and previous != self._serving:
            _remove(previous)

    def _incomplete(self, upload: Upload) -> InvalidRequest | None:
        """Why the upload cannot be served as it stands (no shards, tensors never sent, a tied
        model's output layer unlike its input embeddings), or None."""
        if not upload.shards:
            return InvalidRequest(f"upload {upload.upload_id} has no shards: nothing to commit", "upload_id")
        if self.expected is None:
            return None
        if missing := sorted(set(self.expected) - set(upload.tensors)):
            what = f"{len(missing)} tensor(s) of the served {self.what} were never sent ({few(missing)})"
            return InvalidRequest(what, "upload_id")
        if self.tied and (differs := tied_values_problem(upload.directory, self.expected)):
            return InvalidRequest(differs, "upload_id")
        return None

    def abandon(self, upload_id: str) -> UploadResponse:
        """Delete an upload (its shards arriving now fail)."""
        upload = self._get(upload_id)
        if upload.state == "committing":
            raise Conflict(
                f"upload {upload_id} is being committed: it can no longer be abandoned", "upload_id"
            )
        self._end(upload, "abandoned by its client")
        return self.describe(upload)

    def describe(self, upload: Upload) -> UploadResponse:
        return UploadResponse(
            upload_id=upload.upload_id,
            state=upload.state,  # type: ignore[arg-type]
            shards=list(upload.shards),
            tensors=len(upload.tensors),
            expected_tensors=None if self.expected is None else len(self.expected),
            bytes_received=upload.bytes_received,
            max_bytes=self.max_bytes,
            idle_timeout_s=self.idle_timeout_s,
        )

    # --- expiry ------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Abandon the uploads idle for longer than `idle_timeout_s` (not those with a shard
        arriving or being committed), and drop a committed directory that no longer serves."""
        now = time.monotonic()
        for upload in list(self._uploads.values()):
            if (
                upload.state == "open"
                and not upload.arriving
                and now - upload.last_active > self.idle_timeout_s
            ):
                log.warning(
                    "%s upload %s idle for %.0fs: abandoned", self.what, upload.upload_id, self.idle_timeout_s
                )
                self._end(upload, f"it was idle for more than {self.idle_timeout_s:g}s")
        if self._serving is not None and _resolved(self.in_use()) != self._serving.resolve():
            _remove(self._serving)
            self._serving = None

    def _start_expiry(self) -> None:
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_while_open())

    async def _expire_while_open(self) -> None:
        interval = min(max(self.idle_timeout_s / 4, 0.05), 30.0)
        while self._uploads:
            await asyncio.sleep(interval)
            self.sweep()

    async def aclose(self) -> None:
        """Abandon every upload and stop the expiry task (the caller removes the root)."""
        for upload in list(self._uploads.values()):
            self._end(upload, "the server is shutting down")
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry

    # --- plumbing ----------------------------------------------------------------------------

    def _get(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            why = self._ended.get(upload_id)
            detail = f"it ended: {why}" if why else "no such upload on this server"
            raise NotFound(f"{self.what} upload {upload_id}: {detail}", "upload_id")
        return upload

    def _check_open(self, upload: Upload) -> None:
        if upload.state != "open":
            raise Conflict(
                f"upload {upload.upload_id} is {upload.state}: it takes no more requests", "upload_id"
            )

    def _abandon(self, upload: Upload, exc: ServiceError) -> ServiceError:
        """End the upload because of `exc`, which is returned with that said."""
        self._end(upload, exc.message)
        exc.message += (
            f"; upload {upload.upload_id} abandoned (nothing kept), the served {self.what} is unchanged"
        )
        return exc

    def _end(self, upload: Upload, why: str, keep: bool = False) -> None:
        if self._uploads.pop(upload.upload_id, None) is None:
            return
        upload.state = "committed" if keep else "abandoned"
        self._ended[upload.upload_id] = why
        while len(self._ended) > _FORGOTTEN:
            self._ended.popitem(last=False)
        if not keep:
            _remove(upload.directory)
            log.info("%s upload %s abandoned: %s", self.what, upload.upload_id, why)


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _resolved(path: str | None) -> Path | None:
    return Path(path).resolve() if path else None


class UploadTarget(Protocol[R_co]):
    """Where the uploads of one model go."""

    async def open(self, request: UploadRequest) -> UploadResponse: ...

    async def status(self, upload_id: str) -> UploadResponse: ...

    async def receive(
        self, upload_id: str, shard: str, body: AsyncIterable[bytes], *, sha256: bytes, length: int | None
    ) -> UploadResponse: ...

    async def abandon(self, upload_id: str) -> UploadResponse: ...

    async def commit(self, upload_id: str, request: UploadCommitRequest) -> R_co: ...
