"""Runs: the owners of samples carried over from one rollout call to the next (partial rollouts).

A learner opens a run (`POST /v1/runs`), names it in its calls (`run_id`), and closes it at the end
(`DELETE /v1/runs/{run_id}`). A call of the run that returns early (`return_groups`) with
`leftover: carry` leaves its incomplete groups in the run, still generating (`leftover: hold`: paused
until the run's next call, which resumes them under the weights served then). The run's next call
takes them over: they count toward its return target, their next tokens are judged with its
frozen ESPO state, and they come back, as whole groups, once complete. A weight push suspends the
samples running between calls and resumes them under the new weights (their trajectories record
the version of every span). A run with no call for `idle_timeout_s` is closed and its samples
aborted. No HTTP here, and no maths: the calls (call.py) and the weight pushes (admin.py) drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from espo_client.protocol import RunResponse

from .errors import Conflict, InvalidRequest
from .sample import Sample

log = logging.getLogger(__name__)

_CLOSED_KEPT = 1024  # closed run ids remembered, so a late call hears "closed", not "unknown"


@dataclass
class Group:
    """All `n` samples of one prompt of one call: the unit that is returned, aborted or carried."""

    request_id: str
    """The call that started the group."""
    prompt_index: int
    samples: list[Sample]
    held: bool = False
    """Paused between calls (`leftover: hold`) until the run's next call takes the group over."""

    @property
    def done(self) -> bool:
        return all(s.task is not None and s.task.done() for s in self.samples)

    @property
    def running(self) -> int:
        if self.held:
            return 0
        return sum(1 for s in self.samples if s.task is not None and not s.task.done())

    async def hold(self) -> None:
        """Pause the samples still generating; returns once every token they had is accounted for."""
        self.held = True
        await asyncio.gather(*(s.suspend() for s in self.samples))

    def take_over(self) -> None:
        """A call of the run takes the group: held samples continue (a new engine request each)."""
        if self.held:
            self.held = False
            for sample in self.samples:
                sample.resume()


@dataclass
class Run:
    run_id: str
    groups: list[Group] = field(default_factory=list)
    """Groups carried over, waiting for the next call (some of their samples may still run)."""
    busy: bool = False
    """A call of this run is in progress (it holds the groups)."""
    calls: int = 0
    last_active: float = field(default_factory=time.monotonic)
    aborted: int = 0

    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g.samples]


class RunRegistry:
    """The open runs, their carried groups, and their idle expiry."""

    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._runs: dict[str, Run] = {}
        self._closed: OrderedDict[str, RunResponse] = OrderedDict()
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the API's verbs

    def open(self, run_id: str | None) -> RunResponse:
        """Open a run (opening an open one again is a no-op: a retried POST is harmless)."""
        run_id = run_id or uuid.uuid4().hex
        if run_id in self._closed:
            raise InvalidRequest(f"run {run_id!r} was closed; open a run with a new id", "run_id")
        self._runs.setdefault(run_id, Run(run_id))
        self._start_reaper()
        return self.describe(run_id)

    def describe(self, run_id: str) -> RunResponse:
        if run_id in self._closed:
            return self._closed[run_id]
        run = self.get(run_id)
        return RunResponse(
            run_id=run_id,
            open=True,
            carried_groups=len(run.groups),
            carried_trajectories=len(run.samples()),
            running=sum(g.running for g in run.groups),
            calls=run.calls,
            idle_timeout_s=self.idle_timeout_s,
        )

    async def close(self, run_id: str) -> RunResponse:
        """Close a run: its carried samples are aborted and dropped."""
        if run_id in self._closed:
            return self._closed[run_id]
        run = self.get(run_id)
        if run.busy:
            raise Conflict(f"run {run_id!r} has a call in progress; close it when the call returns", "run_id")
        await self._abort(run)
        return self._forget(run)

    # ------------------------------------------------------------------ calls of a run

    def get(self, run_id: str) -> Run:
        """The open run, or a 400 that says whether it is unknown or closed."""
        run = self._runs.get(run_id)
        if run is not None:
            return run
        if run_id in self._closed:
            raise InvalidRequest(f"run {run_id!r} is closed", "run_id")
        raise InvalidRequest(f"run {run_id!r} is unknown: open it first with POST /v1/runs", "run_id")

    def claim(self, run_id: str) -> Run:
        """A call of the run starts: it takes the run's carried groups (returned by `release`)."""
        run = self.get(run_id)
        if run.busy:
            raise Conflict(f"run {run_id!r} already has a call in progress", "run_id")
        run.busy = True
        run.calls += 1
        run.last_active = time.monotonic()
        return run

    def release(self, run: Run, carried: list[Group]) -> None:
        """The call ended: `carried` are the groups the run keeps for its next call."""
        run.groups = carried
        run.busy = False
        run.last_active = time.monotonic()

    # ------------------------------------------------------------------ weight pushes

    def background(self) -> list[Sample]:
        """Samples generating between calls of their run (none while the run has a call; held ones
        are paused already)."""
        idle = [g for run in self._runs.values() if not run.busy for g in run.groups]
        return [s for g in idle if not g.held for s in g.samples]

    # ------------------------------------------------------------------ expiry, shutdown

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="espo-run-reaper")

    async def _reap(self) -> None:
        while self._runs:
            await asyncio.sleep(min(30.0, self.idle_timeout_s / 4))
            now = time.monotonic()
            for run in list(self._runs.values()):
                if not run.busy and now - run.last_active > self.idle_timeout_s:
                    log.warning(
                        "run %s idle for %.0fs: closed, its samples aborted",
                        run.run_id,
                        now - run.last_active,
                    )
                    await self._abort(run)
                    self._forget(run)

    async def aclose(self) -> None:
        """Shutdown: every run's samples are aborted."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for run in list(self._runs.values()):
            await self._abort(run)
            self._forget(run)

    async def _abort(self, run: Run) -> None:
        samples = [s for s in run.samples() if s.task is not None and not s.task.done()]
        await asyncio.gather(*(s.abort() for s in samples))
        await asyncio.gather(*(s.task for s in samples if s.task is not None), return_exceptions=True)
        run.aborted += len(samples)

    def _forget(self, run: Run) -> RunResponse:
        self._runs.pop(run.run_id, None)
        closed = RunResponse(
            run_id=run.run_id,
            open=False,
            aborted=run.aborted,
            calls=run.calls,
            idle_timeout_s=self.idle_timeout_s,
        )
        self._closed[run.run_id] = closed
        while len(self._closed) > _CLOSED_KEPT:
            self._closed.popitem(last=False)
        return closed
