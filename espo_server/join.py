"""Joining warm (`--join URL`): a replica that starts late copies what a running one serves.

A replica that restarts or is added mid-training would otherwise serve the weights it started with
(policy version 0) and a cold ESPO state until the learner pushes again. With `--join`, once its
engines are up and while /readyz answers 503 (detail `join`), it copies from the peer at URL:

    1. the policy's files (GET /v1/weights/files, then each file), into a directory of its own
       beside its uploads (--upload-dir), each checked against the size and SHA-256 listed;
    2. the in-process critic's the same way (GET /v1/critic/weights/files; a remote critic server
       is shared by the replicas: nothing to copy);
    3. reads the peer's ESPO state (GET /v1/espo/state);
    4. checks that the peer's versions did not change meanwhile (else it copies again, a few times),
       so that the weights and the state are of the same versions;
    5. loads the weights through the push of a path (`serve_weights`, `update_critic`: the same
       checks of the checkpoint, the same version bookkeeping), at the peer's versions;
    6. sets the state it read as its own.

Then it is ready. A peer that cannot be reached, or answers 503 (it is starting, draining or joining
itself), is retried for `join_timeout_s`. Anything the replica cannot use (a file that fails its
checks, weights its engine refuses, a state it refuses, a peer that answers 4xx) keeps it unready
with the reason in /readyz's detail and the log: a replica serving the wrong weights is worse than
one replica fewer. Only a peer that never answered may be given up on (`join_required=false`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from espo_client.protocol import EspoState, StateResponse, WeightFilesResponse

from .admin import JoinStatus
from .config import ServerConfig
from .critic_engine import InProcessCritic
from .errors import ServiceError
from .upload_targets import LocalUploads
from .uploads import UploadStore
from .weight_files import is_weight_file

if TYPE_CHECKING:
    from .service import RolloutService

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 3
"""Copies tried before giving up, when the peer's weights change under the copy or a file fails its
checks (a push on the peer replaced the file being read)."""
PROGRESS_EVERY_S = 5.0
RETRY_WAIT_S = (0.5, 5.0)
"""The wait between two tries of an unreachable peer: from the first to the last, doubling."""
_CHUNK = 1 << 20


class JoinError(Exception):
    """Why the replica could not join; it stays unready and says this."""


class PeerUnreachable(JoinError):
    """The peer never answered within the join timeout (no connection, or only 503s)."""


class PeerRefused(JoinError):
    """The peer answered an error other than 503 (`status`): a wrong key, port or URL."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class FileCheckFailed(JoinError):
    """A copied file is not what the peer listed (a push on the peer may have replaced it): the
    copy is tried again, up to ATTEMPTS times."""


class Peer:
    """The server joined, over HTTP: reads retried while it cannot be reached or answers 503."""

    def __init__(self, url: str, *, api_key: str | None, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(60.0, connect=5.0)
        )
        self.timeout_s = timeout_s
        self.answered = False
        """Whether the peer gave an answer other than 503 (then it is there, and not given up on)."""

    async def aclose(self) -> None:
        await self.client.aclose()

    async def json(self, path: str) -> object:
        response = await self._retried(path, lambda: self.client.get(path))
        try:
            return response.json()
        except ValueError as exc:
            raise JoinError(f"{self.url}{path} answered something that is not JSON") from exc

    async def download(self, path: str, into: Path, progress: Callable[[int], None]) -> tuple[int, str]:
        """The file at `path` written to `into`: its size and SHA-256 (hex). A transfer cut short is
        tried again from the start within the timeout."""

        async def once() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            async with self.client.stream("GET", path) as response:
                self._check(path, response, await response.aread() if response.status_code >= 400 else b"")
                with into.open("wb") as out:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        progress(len(chunk))
            return size, digest.hexdigest()

        return await self._retried(path, once)

    async def _retried(self, path: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.timeout_s
        wait = RETRY_WAIT_S[0]
        while True:
            try:
                result = await call()
                if isinstance(result, httpx.Response):
                    self._check(path, result, result.content)
                return result
            except (httpx.TransportError, _Busy) as exc:
                why = str(exc) or repr(exc)
            if time.monotonic() + wait > deadline:
                raise PeerUnreachable(f"{self.url}{path}: no answer within {self.timeout_s:g}s ({why})")
            log.warning("join: %s%s: %s; trying again in %.1fs", self.url, path, why, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_WAIT_S[1])

    def _check(self, path: str, response: httpx.Response, body: bytes) -> None:
        self.answered = self.answered or response.status_code != 503
        if response.status_code < 400:
            return
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body[:300].decode(errors="replace")
        if response.status_code == 503:
            raise _Busy(f"503 {message}")
        raise PeerRefused(
            f"{self.url}{path} answered {response.status_code}: {message}", response.status_code
        )


class _Busy(Exception):
    """The peer answered 503: it is starting, draining or joining; worth another try."""


async def fetch_checkpoint(
    peer: Peer, prefix: str, into: Path, what: str, note: Callable[[str], None]
) -> tuple[int, Path]:
    """Copy the `what` weights the peer serves (listed at `prefix`) into the new directory `into`,
    each file checked against the size and SHA-256 listed; the version they serve as, and `into`."""
    try:
        listing = WeightFilesResponse.model_validate(await peer.json(prefix))
    except ValidationError as exc:
        raise JoinError(f"{peer.url}{prefix}: not a listing of weight files ({_first(exc)})") from exc
    bad = [f.name for f in listing.files if not is_weight_file(f.name)]
    if bad or not any(f.name.endswith(".safetensors") for f in listing.files):
        raise JoinError(f"the peer's {what} files {bad or '(none)'} are not a checkpoint's (*.safetensors)")
    into.mkdir(parents=True)
    total, done = sum(f.size for f in listing.files), 0
    started = last = time.monotonic()

    def progress(n: int) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
            last = time.monotonic()
            rate = done / max(last - started, 1e-6) / 2**20
            copied = f"{_mib(done)} of {_mib(total)} MiB, {rate:.1f} MiB/s"
            note(f"copying the {what} weights (version {listing.version}): {copied}")

    try:
        for file in listing.files:
            try:
                size, sha256 = await peer.download(f"{prefix}/{file.name}", into / file.name, progress)
            except PeerRefused as exc:
                if exc.status != 404:
                    raise
                raise FileCheckFailed(f"the peer's {what} file {file.name} is gone ({exc})") from exc
            if size != file.size or sha256 != file.sha256:
                raise FileCheckFailed(
                    f"the peer's {what} file {file.name} arrived with {size} bytes and SHA-256 {sha256}; "
                    f"its listing says {file.size} bytes and {file.sha256}"
                )
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return listing.version, into


async def join(
    service: RolloutService, peer: Peer, stores: dict[str, UploadStore], note: Callable[[str], None]
) -> str:
    """Copy, load and set what the peer serves (the module docstring); a summary of it. The copies
    go into the upload stores' directories (`stores`: "policy", and "critic" for an in-process one),
    which delete them, as they do a committed upload, once other weights serve."""
    critic = service.critic if isinstance(service.critic, InProcessCritic) else None
    problem = ""
    for attempt in range(1, ATTEMPTS + 1):
        before = await _info(peer)
        note(f"copying from {peer.url} (policy version {before.policy_version}), try {attempt} of {ATTEMPTS}")
        copies: list[tuple[int, Path]] = []
        try:
            copies.append(
                await fetch_checkpoint(
                    peer, "/v1/weights/files", _new(stores["policy"], "policy"), "policy", note
                )
            )
            if critic is not None:
                prefix = "/v1/critic/weights/files"
                copies.append(
                    await fetch_checkpoint(peer, prefix, _new(stores["critic"], "critic"), "critic", note)
                )
            state = await _state(peer)  # read before the check: it goes with the versions copied
            after = await _info(peer)
            if copies[0][0] == after.policy_version and _versions(after) == _versions(before):
                try:
                    return await _load(service, critic, copies, state, peer, note)
                finally:  # a copy that serves is the store's to delete later; the others go now
                    serving = {service.engine.weights_path, critic.weights_dir if critic else None}
                    for what, (_, directory) in zip(("policy", "critic"), copies, strict=False):
                        if str(directory) in serving:
                            stores[what].adopt(directory)
                        else:
                            shutil.rmtree(directory, ignore_errors=True)
            problem = (
                f"the peer's weights changed during the copy (policy version {before.policy_version} -> "
                f"{after.policy_version}, critic version {before.critic_version} -> {after.critic_version})"
            )
        except FileCheckFailed as exc:
            problem = str(exc)
        except BaseException:  # the join ends here: a copy that does not serve is no one's
            _discard(copies, service, critic)
            raise
        _discard(copies, service, critic)
        log.warning("join: try %d of %d: %s", attempt, ATTEMPTS, problem)
    raise JoinError(problem)


def _discard(copies: list[tuple[int, Path]], service: RolloutService, critic: InProcessCritic | None) -> None:
    """Delete the copies that do not serve (one that serves belongs to its upload store)."""
    serving = {service.engine.weights_path, critic.weights_dir if critic else None}
    for _, directory in copies:
        if str(directory) not in serving:
            shutil.rmtree(directory, ignore_errors=True)


class PeerVersions(BaseModel):
    """What the join reads of the peer's GET /v1/info: the versions serving."""

    policy_version: int
    critic_version: int | None = None


def _versions(info: PeerVersions) -> tuple[int, int | None]:
    return info.policy_version, info.critic_version


async def _load(
    service: RolloutService,
    critic: InProcessCritic | None,
    copies: list[tuple[int, Path]],
    state: EspoState,
    peer: Peer,
    note: Callable[[str], None],
) -> str:
    """Serve the copies (the policy's, then the critic's) as a push by path would, then the state."""
    version, policy = copies[0]
    note(f"loading the policy weights copied from {peer.url} as version {version}")
    try:
        await service.admin.serve_weights(policy, version)  # not a learner's push: not refused, not counted
    except ServiceError as exc:
        raise JoinError(f"the peer's policy weights cannot be served here: {exc.message}") from exc
    summary = f"policy version {version}"
    if critic is not None:
        critic_version, directory = copies[1]
        note(f"loading the critic weights copied from {peer.url} as version {critic_version}")
        try:
            await service.admin.update_critic(lambda: critic.load_weights(str(directory), critic_version))
        except ServiceError as exc:
            raise JoinError(f"the peer's critic weights cannot be served here: {exc.message}") from exc
        summary += f", critic version {critic_version}"
    try:
        service.set_state(state)
    except ServiceError as exc:
        raise JoinError(f"the peer's ESPO state was refused: {exc.message}") from exc
    return f"{summary}, ESPO state (warm={state.warm}, batches={state.batches})"


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"


async def _state(peer: Peer) -> EspoState:
    try:
        return StateResponse.model_validate(await peer.json("/v1/espo/state")).state
    except ValidationError as exc:
        raise JoinError(f"the peer's ESPO state is not one this server takes: {_first(exc)}") from exc


async def _info(peer: Peer) -> PeerVersions:
    try:
        return PeerVersions.model_validate(await peer.json("/v1/info"))
    except ValidationError as exc:
        raise JoinError(f"{peer.url}/v1/info: not an espo-server's info ({_first(exc)})") from exc


def _new(store: UploadStore, what: str) -> Path:
    return store.root / f"joined-{what}-{uuid.uuid4().hex[:12]}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


async def run_join(
    service: RolloutService, config: ServerConfig, stores: dict[str, UploadStore], status: JoinStatus
) -> None:
    """Join `config.join`, keeping `status` (what /readyz reports) up to date; never raises."""
    assert config.join is not None
    peer = Peer(config.join, api_key=config.api_key, timeout_s=config.join_timeout_s)

    def note(detail: str) -> None:
        status.detail = f"joining: {detail}"
        log.info("join: %s", detail)

    try:
        summary = await join(service, peer, stores, note)
        status.detail, status.done = f"joined {peer.url}: {summary}", True
        log.info("join: %s; ready", status.detail)
    except PeerUnreachable as exc:
        if config.join_required or peer.answered:  # a peer that answered is there: not given up on
            status.detail = f"join failed: {exc}"
            log.error("join: %s; not ready (join_required)", status.detail)
        else:
            status.detail = f"no peer answered ({exc}): serving as started, policy version 0, cold state"
            status.done = True
            log.warning("join: %s", status.detail)
    except JoinError as exc:
        status.detail = f"join failed: {exc}"
        log.error("join: %s; not ready", status.detail)
    except Exception as exc:  # a bug or an engine failure: say so rather than hang "joining"
        status.detail = f"join failed: {exc!r}"
        log.exception("join failed; not ready")
    finally:
        await peer.aclose()


@contextlib.asynccontextmanager
async def joining(service: RolloutService, config: ServerConfig, uploads: dict) -> AsyncIterator[None]:
    """While inside, join `config.join` in the background (nothing without --join); the copies are
    staged beside the uploads (`upload_targets`)."""
    if config.join is None:
        yield
        return
    status = service.admin.join = JoinStatus(f"joining: {config.join} (not started)")
    stores = {what: t.store for what, t in uploads.items() if isinstance(t, LocalUploads)}
    task = asyncio.get_running_loop().create_task(run_join(service, config, stores, status), name="espo-join")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
