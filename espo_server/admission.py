"""Who gets in: the server's load, and its way out.

New work (a call, a weight push, a run) is refused while the server drains after SIGTERM (503
shutting_down, with Retry-After) or once its engine's process is gone (503 engine_dead), and while a
failed push left the weights half-loaded (503 weights_broken). A call that would overfill the
engine is told to come back later (429 overloaded). The drain gives the running calls a grace
period, then cuts those still running (each answered with that 503, nothing of it kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from .engine import ENGINE_DEAD_MESSAGE, Engine
from .errors import EngineDead, Overloaded, ServiceError, ShuttingDown, WeightsBroken

log = logging.getLogger(__name__)

OVERLOADED_RETRY_S = 2.0
"""The Retry-After of a 429: about how long the samples generating now take to make room."""


class Admission:
    """The server's load (calls and samples running) and the checks new work goes through."""

    def __init__(self, engine: Engine, max_inflight: int) -> None:
        self.engine = engine
        self.max_inflight = max_inflight
        self.draining = False
        """Set by `drain` (SIGTERM): no new work is taken; running calls may finish."""
        self.running = 0
        """Calls running now (replays and waiting retries aside)."""
        self.inflight = 0
        """Samples generating now (all calls, and the samples runs carry), for backpressure."""
        self._cuts: set[asyncio.Future[ServiceError | None]] = set()
        self._failure: Callable[[], ServiceError] | None = None

    # ------------------------------------------------------------------ checks

    def check_alive(self) -> None:
        """EngineDead (503) once the policy engine's process is gone: every /v1 call says so until
        the server has exited (serve.py watches for it)."""
        if self.engine.dead:
            raise EngineDead(ENGINE_DEAD_MESSAGE)

    def check_new_work(self) -> None:
        """New work (a call, a weight push, a run) is refused while draining, or with a dead engine."""
        self.check_alive()
        if self.draining:
            raise ShuttingDown(
                "this server is shutting down (SIGTERM) and takes no new work: retry on another "
                "replica or after the restart, with the same request_id"
            )

    def check_weights(self) -> None:
        """WeightsBroken (503) while a failed push and its failed roll-back left the weights half-loaded."""
        if self.engine.broken is not None:
            raise WeightsBroken(self.engine.broken)

    def check_room(self, wanted: int) -> None:
        """Overloaded (429) if `wanted` more samples would exceed the samples generating at once."""
        if self.inflight + wanted > self.max_inflight:
            raise Overloaded(
                f"{self.inflight} trajectories are generating; {wanted} more would exceed "
                f"max_inflight_trajectories={self.max_inflight}: retry later",
                retry_after_s=OVERLOADED_RETRY_S,
            )

    # ------------------------------------------------------------------ the load

    def sample_started(self, task: asyncio.Task) -> None:
        self.inflight += 1
        task.add_done_callback(self._sample_ended)

    def _sample_ended(self, _: asyncio.Task) -> None:
        self.inflight -= 1

    @contextlib.contextmanager
    def call(self) -> Iterator[asyncio.Future[ServiceError | None]]:
        """A call runs while inside; the future is done when a shutdown cuts it (`cut_calls`: None)
        or the engine died (`fail_calls`: the error to answer with)."""
        cut: asyncio.Future[ServiceError | None] = asyncio.get_running_loop().create_future()
        if self._failure is not None:  # planned before the engine died, begun after
            cut.set_result(self._failure())
        self._cuts.add(cut)
        self.running += 1
        try:
            yield cut
        finally:
            self.running -= 1
            self._cuts.discard(cut)

    # ------------------------------------------------------------------ the way out

    async def drain(self, grace_s: float) -> int:
        """SIGTERM: take no new work (503 shutting_down, with Retry-After) and give the running calls
        `grace_s` seconds to finish and be answered. Calls still running then are cut: answered
        with that 503, nothing of them folded into the ESPO state, so that a retry with the same
        request_id runs them again. Returns once no call runs; the number of calls cut."""
        self.draining = True
        log.info("draining: %d call(s) running, %.0fs to finish", self.running, grace_s)
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.running
        if cut:
            log.warning("drain: %d call(s) still running after %.0fs: ended with 503", cut, grace_s)
            self.cut_calls()
            deadline = time.monotonic() + 10.0
            while self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return cut

    def cut_calls(self) -> None:
        """End every running call now with ShuttingDown (the end of a drain, or a second SIGTERM)."""
        self.draining = True
        self._end_calls(lambda: None)

    def fail_calls(self) -> None:
        """The engine's process is gone: end every running call, and any begun later, with
        EngineDead, and every stream being read (vLLM leaves the requests the killed process had
        not read yet hanging, so samples would wait on them for ever)."""
        self._failure = lambda: EngineDead(ENGINE_DEAD_MESSAGE)
        self.engine.fail_streams()
        self._end_calls(self._failure)

    def _end_calls(self, error: Callable[[], ServiceError | None]) -> None:
        for cut in self._cuts:
            if not cut.done():
                cut.set_result(error())
