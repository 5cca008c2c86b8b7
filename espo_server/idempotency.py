"""Calls by request_id: a retry gets the first call's answer, never a second batch of samples.

A call that names a `request_id` is keyed by that id and by a hash of the rest of its body. A
retry with the same id and body gets the finished answer again (replayed), or waits for the
running call and then gets its answer; if the running call was cancelled or failed (it folded
nothing), the retry runs the call itself. The same id with another body is a conflict (409):
answering it with the first call's trajectories would hand the learner wrong data. Finished
answers are kept within a count, a byte budget and an age, whichever binds first; ids the server
generated itself are not kept (nobody can retry with them).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from espo_client.protocol import RolloutRequest, RolloutResponse

from .errors import Conflict


class CallEnded(RuntimeError):
    """The running call a retry waited for was cancelled or failed."""


@dataclass
class _Finished:
    fingerprint: str
    response: RolloutResponse
    size: int
    at: float


def fingerprint(request: RolloutRequest) -> str:
    """A hash of everything in the request but its request_id."""
    return hashlib.sha256(request.model_dump_json(exclude={"request_id"}).encode()).hexdigest()


def response_size(response: RolloutResponse) -> int:
    """Bytes the answer takes, about (its JSON): ~24 per token id + logprob, more with traces."""
    per_token = 24 + 18 * sum(
        1 for name in ("regret", "z", "values", "entropy") if _has_trace(response, name)
    )
    tokens = sum(len(t.token_ids) for t in response.trajectories)
    return 2048 + 400 * len(response.trajectories) + per_token * tokens


def _has_trace(response: RolloutResponse, name: str) -> bool:
    return any(
        t.traces is not None and getattr(t.traces, name) is not None for t in response.trajectories[:1]
    )


class IdempotencyCache:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self._running: dict[str, tuple[str, asyncio.Future[RolloutResponse]]] = {}
        self.bytes = 0

    def lookup(self, request: RolloutRequest) -> RolloutResponse | asyncio.Future[RolloutResponse] | None:
        """The finished answer or the running call's future for this request_id, or None (a new
        call); Conflict if the id was used with another body."""
        rid = request.request_id
        if rid is None:
            return None
        self._expire()
        fp = fingerprint(request)
        if rid in self._finished:
            self._check(rid, self._finished[rid].fingerprint, fp)
            return self._finished[rid].response
        if rid in self._running:
            self._check(rid, self._running[rid][0], fp)
            return self._running[rid][1]
        return None

    def begin(self, request: RolloutRequest) -> asyncio.Future[RolloutResponse] | None:
        """Register a call as running (retries wait on the future); None for an unnamed call."""
        if request.request_id is None:
            return None
        future: asyncio.Future[RolloutResponse] = asyncio.get_running_loop().create_future()
        self._running[request.request_id] = (fingerprint(request), future)
        return future

    def finish(self, request: RolloutRequest, response: RolloutResponse) -> None:
        rid = request.request_id
        if rid is None:
            return
        fp, future = self._running.pop(rid, (fingerprint(request), None))
        if future is not None and not future.done():
            future.set_result(response)
        if self.max_entries <= 0 or self.max_bytes <= 0:
            return
        size = response_size(response)
        if size > self.max_bytes:
            return  # larger than the whole budget: not kept (a retry runs again)
        self._finished[rid] = _Finished(fp, response, size, time.monotonic())
        self.bytes += size
        while len(self._finished) > self.max_entries or self.bytes > self.max_bytes:
            self._evict_oldest()

    def fail(self, request: RolloutRequest, exc: BaseException) -> None:
        """The call was cancelled or failed: waiting retries run the call themselves."""
        if request.request_id is None:
            return
        _, future = self._running.pop(request.request_id, ("", None))
        if future is not None and not future.done():
            future.set_exception(CallEnded(f"the first call with this request_id ended: {exc!r}"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits

    def _check(self, rid: str, known: str, fp: str) -> None:
        if known != fp:
            raise Conflict(
                f"request_id {rid!r} was already used for a call with another body; use a new "
                "request_id for a new call (a retry must resend the same body)",
                "request_id",
            )

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._finished and next(iter(self._finished.values())).at < deadline:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, entry = self._finished.popitem(last=False)
        self.bytes -= entry.size
