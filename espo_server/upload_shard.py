"""One shard of a weight upload: a safetensors file read from a body as it arrives, checked, written.

The header comes first in a safetensors file, so it is read and judged before any tensor data:
`check(specs, size)` (the upload's: known tensors, shapes, dtypes, byte limit) raises to refuse
the shard. The data then goes to disk in batches of `WRITE_BATCH` bytes, each written and hashed on
a worker thread while the next batch arrives, so a shard is never held whole in memory and the
event loop never waits on the disk. The body must end exactly where the header says, and its
SHA-256 must be the one sent with it. The file appears under its name only once it is whole.
No HTTP, no vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .errors import InvalidRequest, TooLarge
from .weights import (
    MAX_HEADER,
    TIED_HINT,
    TensorSpec,
    is_output_embedding,
    parse_header,
    spec_problem,
    tied_partner,
)

WRITE_BATCH = 8 << 20
"""Bytes gathered from the body before one write (and hash) on a worker thread."""


async def receive_shard(
    directory: Path,
    shard: str,
    body: AsyncIterator[bytes],
    *,
    sha256: bytes,
    length: int | None,
    check: Callable[[dict[str, TensorSpec], int], None],
    still_wanted: Callable[[], bool] = lambda: True,
    idle_timeout_s: float | None = None,
) -> tuple[dict[str, TensorSpec], int]:
    """Write the shard read from `body` to `directory/shard`; return its tensors and size.
    InvalidRequest (param `shard`, or `sha256`) names what is wrong; `check`'s errors go through;
    `still_wanted()` turning false (the upload was abandoned meanwhile) stops it, and so does a
    body that sends nothing for `idle_timeout_s` (a client that stalled without going away)."""
    reader = _Reader(body, shard, idle_timeout_s)
    head = await reader.exactly(8)
    if len(head) < 8:
        raise InvalidRequest(f"shard {shard}: the body ended after {len(head)} bytes (truncated)", "shard")
    (header_length,) = struct.unpack("<Q", head)
    if header_length > MAX_HEADER:
        raise InvalidRequest(
            f"shard {shard} is not a safetensors file (header length {header_length})", "shard"
        )
    raw = await reader.exactly(header_length)
    if len(raw) < header_length:
        raise InvalidRequest(f"shard {shard}: the body ended inside its header (truncated)", "shard")
    try:
        specs, data_length = parse_header(raw)
    except ValueError as exc:
        raise InvalidRequest(f"shard {shard}: {exc}", "shard") from exc
    size = 8 + header_length + data_length
    if length is not None and length != size:
        raise InvalidRequest(f"shard {shard}: the request says {length} bytes, its header {size}", "shard")
    check(specs, size)
    part = directory / f".{shard}.part"
    try:
        digest = await _write(part, head + raw, reader, data_length, shard, still_wanted)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise InvalidRequest(f"shard {shard}: its SHA-256 is not the one sent with it", "sha256")
    part.rename(directory / shard)
    return specs, size


async def _write(
    part: Path, head: bytes, reader: _Reader, data_length: int, shard: str, still_wanted: Callable[[], bool]
) -> bytes:
    hasher = hashlib.sha256(head)
    left = data_length
    with part.open("wb") as f:
        f.write(head)
        writing: asyncio.Future[None] | None = None  # one batch goes to disk while the next arrives
        try:
            async for batch in reader.batches(WRITE_BATCH):
                if len(batch) > left:
                    raise InvalidRequest(
                        f"shard {shard}: more bytes than its header describes ({len(head) + data_length})",
                        "shard",
                    )
                left -= len(batch)
                if writing is not None:
                    await writing
                if not still_wanted():
                    raise InvalidRequest(f"shard {shard}: the upload ended while it arrived", "shard")
                writing = asyncio.ensure_future(asyncio.to_thread(_write_batch, f, hasher, batch))
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                with contextlib.suppress(Exception):  # the file stays open until its thread is done
                    await asyncio.shield(writing)
    if left:
        raise InvalidRequest(
            f"shard {shard}: the body ended {left} bytes short of what its header describes (truncated)",
            "shard",
        )
    return hasher.digest()


def check_tensors(
    shard: str,
    specs: dict[str, TensorSpec],
    size: int,
    *,
    sent: dict[str, TensorSpec],
    expected: dict[str, TensorSpec] | None,
    room: int,
    limit: int,
    tied: bool = False,
) -> None:
    """Refuse a shard whose header names a tensor `sent` before, or one the served model (its
    `expected` tensors; None: unknown) does not have or has in another shape or kind of dtype, or
    whose `size` exceeds the `room` left under the upload's byte limit (TooLarge). With `tied`, an
    output layer is taken as a copy of the input embeddings (its values are checked at commit)."""
    for name, spec in specs.items():
        if name in sent:
            raise InvalidRequest(f"shard {shard}: tensor {name} was already sent in another shard", "shard")
        partner = tied_partner(name, expected) if tied and expected is not None else None
        want = spec if expected is None else expected.get(partner or name)
        if want is None:
            hint = f": {TIED_HINT.format(name=name)}" if tied and is_output_embedding(name) else ""
            raise InvalidRequest(f"shard {shard}: {name} is not a tensor of the served model{hint}", "shard")
        problem = spec_problem(name, spec, want)
        if problem:
            raise InvalidRequest(f"shard {shard}: {problem}", "shard")
    if size > room:
        raise TooLarge(
            f"shard {shard} ({size} bytes) would take the upload past its limit of {limit} bytes "
            f"({limit - room} taken; --upload-max-bytes)",
            "shard",
        )


def _write_batch(f, hasher, batch: bytes) -> None:
    f.write(batch)
    hasher.update(batch)


class _Reader:
    """Exact reads and big batches over a body that arrives in chunks of any size."""

    def __init__(self, body: AsyncIterator[bytes], shard: str, idle_timeout_s: float | None) -> None:
        self._body = body
        self._shard = shard
        self._idle_timeout_s = idle_timeout_s
        self._chunks: list[bytes] = []
        self._size = 0
        self._ended = False

    async def _fill(self, size: int) -> None:
        while self._size < size and not self._ended:
            try:
                chunk = await asyncio.wait_for(anext(self._body), self._idle_timeout_s)
            except StopAsyncIteration:
                self._ended = True
                return
            except asyncio.TimeoutError:
                raise InvalidRequest(
                    f"shard {self._shard}: no bytes for {self._idle_timeout_s:g}s (its idle timeout)",
                    "shard",
                ) from None
            if chunk:
                self._chunks.append(bytes(chunk))
                self._size += len(chunk)

    def _take(self, size: int) -> bytes:
        data = b"".join(self._chunks)
        out, rest = data[:size], data[size:]
        self._chunks, self._size = ([rest] if rest else []), len(rest)
        return out

    async def exactly(self, size: int) -> bytes:
        """The next `size` bytes (fewer only if the body ended)."""
        await self._fill(size)
        return self._take(size)

    async def batches(self, size: int) -> AsyncIterator[bytes]:
        """The rest of the body, in batches of at least `size` bytes (the last may be smaller)."""
        while True:
            await self._fill(size)
            if not self._size:
                return
            yield self._take(self._size)
