"""Every critic query of every sample goes through a `CriticBatcher`: queries that arrive within a
short window (up to a bounded batch) become one critic call, which counts against one timeout; its
answer says which critic version computed the values and how many tokens the critic really computed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import metrics
from .critic import CriticClient, CriticError, score_with


@dataclass(frozen=True)
class CriticValue:
    """One query's answer."""

    value: float
    version: int | None
    computed_tokens: int
    batch_size: int


@dataclass
class _Query:
    prefix: list[int]
    future: asyncio.Future[CriticValue]
    asked: float = field(default_factory=time.perf_counter)


class CriticBatcher:
    """Gathers concurrent queries into one critic call: a batch is sent `window_s` after its first
    query arrived (0: once the event loop has run the tasks that are ready, i.e. the queries raised
    by the same engine step), or at once when it holds `max_batch` queries. With `window_steps` > 0
    the window is counted in policy steps instead: a batch whose first query came from a sample
    reading its stream (`opener`) is sent once that sample has read `window_steps` more tokens
    (`stepped`), or as soon as it stops reading (`left`). With `max_in_flight` > 0 at most that
    many batches run at once: a batch due while they all run waits, gathering every query asked
    meanwhile, and goes the moment one of them ends (an idle critic is asked at once, a busy one in
    larger batches). A batch counts against one timeout, `timeout_s`, from when it is sent; if it
    fails or times out, every query it held raises CriticError. Batches run concurrently; a
    cancelled query leaves its batch alone.

    Counted here, per query: `espo_critic_calls_total{outcome=ok|error|timeout|cancelled}` (so that
    it sums to the responses' `critic_calls`; cancelled: asked, never used) and
    `espo_critic_latency_seconds` (from the ask to the answer); per batch: `espo_critic_batch_size`,
    and the tokens.
    """

    def __init__(
        self,
        client: CriticClient,
        *,
        timeout_s: float,
        window_s: float = 0.0,
        window_steps: int = 0,
        max_batch: int = 64,
        max_in_flight: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_steps < 0:
            raise ValueError(f"window_steps must be >= 0, got {window_steps}")
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        self.client = client
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.window_steps = window_steps
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._held = False
        """A batch is due but `max_in_flight` batches run: it goes when one of them ends."""
        self._opener: object | None = None
        """The sample whose steps time the open batch (window_steps > 0)."""
        self._steps_left = 0
        self._pending: list[_Query] = []
        self._timer: asyncio.Handle | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.client.name

    async def value(self, prefix: Sequence[int], opener: object | None = None) -> CriticValue:
        """V of one prefix, batched with whatever else is asked meanwhile. Raises CriticError.
        A list is kept as it is, not copied (the caller builds one per query and leaves it alone).
        `opener`: the asking sample, if it is reading its stream and will report its steps."""
        loop = asyncio.get_running_loop()
        query = _Query(prefix if isinstance(prefix, list) else list(prefix), loop.create_future())
        self._pending.append(query)
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None and self._opener is None and not self._held:
            if self.window_steps > 0 and opener is not None:
                self._opener, self._steps_left = opener, self.window_steps
            elif self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        try:
            return await query.future
        except asyncio.CancelledError:
            if query.future.cancelled():  # the sample ended (aborted) before the answer came
                metrics.CRITIC_CALLS.labels(outcome="cancelled").inc()
            raise

    def stepped(self, sample: object, tokens: int = 1) -> None:
        """`sample` read `tokens` more tokens: the batch it opened goes once it has read
        `window_steps` of them."""
        if sample is self._opener:
            self._steps_left -= tokens
            if self._steps_left <= 0:
                self._flush()

    def left(self, sample: object) -> None:
        """`sample` stopped reading its stream (it ended, was stopped, suspended or aborted): the batch
        it opened goes now, as no step of its will send it."""
        if sample is self._opener:
            self._flush()

    def _flush(self) -> None:
        self._opener = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.max_in_flight and len(self._running) >= self.max_in_flight:
            self._held = True
            return
        self._held = False
        pending = [q for q in self._pending if not q.future.done()]
        self._pending = []
        for start in range(0, len(pending), self.max_batch):
            task = asyncio.create_task(self._send(pending[start : start + self.max_batch]))
            self._running.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._held:
            self._flush()

    async def _send(self, batch: list[_Query]) -> None:
        metrics.CRITIC_BATCH_SIZE.observe(len(batch))
        error: CriticError | None = None
        outcome = "ok"
        try:
            answer = await asyncio.wait_for(
                score_with(self.client, [q.prefix for q in batch]), self.timeout_s
            )
            if len(answer.values) != len(batch) or len(answer.computed_tokens) != len(batch):
                raise CriticError(f"critic returned {len(answer.values)} values for {len(batch)} prefixes")
        except asyncio.TimeoutError:
            outcome = "timeout"
            error = CriticError(f"critic timed out after {self.timeout_s}s (a batch of {len(batch)} queries)")
        except CriticError as exc:
            outcome, error = "error", exc
        except Exception as exc:  # transport errors, engine errors: all mean "no value"
            outcome, error = "error", CriticError(f"critic failed: {exc!r}")
        now = time.perf_counter()
        cancelled = sum(q.future.cancelled() for q in batch)  # counted by `value` already
        metrics.CRITIC_CALLS.labels(outcome=outcome).inc(len(batch) - cancelled)
        if error is not None:
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(error)
                    q.future.exception()  # retrieved: a query cancelled meanwhile must not warn
            return
        metrics.CRITIC_TOKENS.inc(sum(answer.computed_tokens))
        metrics.CRITIC_PREFIX_TOKENS.inc(sum(len(q.prefix) for q in batch))
        for q, value, tokens in zip(batch, answer.values, answer.computed_tokens, strict=True):
            metrics.CRITIC_LATENCY.observe(now - q.asked)
            if not q.future.done():
                q.future.set_result(CriticValue(float(value), answer.version, int(tokens), len(batch)))

    async def aclose(self) -> None:
        """Cancel the batches in flight and the queries still waiting."""
        self._opener, self._held = None, False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in self._pending:
            if not q.future.done():
                q.future.cancel()
        self._pending = []
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
