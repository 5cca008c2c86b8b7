"""The server-owned ESPO state and its batches. Pure bookkeeping: no vLLM, no HTTP, no awaits.

Causality: the state a call runs with is read when the call starts and never changes during the
batch. A call without `batch_id` is a batch of its own: its statistics are folded in when it ends.
Calls sharing a `batch_id` all run with the state read when that batch opened; their statistics
accumulate and are folded in once, when the batch is closed: by `commit` (POST /v1/espo/commit) or
by the first call that names another batch_id. The maths is `espo_client.stop_rule.update_state`,
the same code a learner that owns its state runs.

The rules that keep this exact (each enforced here, each a 409 when broken):
- a batch closes only when none of its calls is running (a late call would otherwise be folded
  in as an extra batch of its own, an extra EMA and beta step);
- a call that is cancelled or fails leaves its batch as if it had never started;
- only calls that fold into the server-owned state take part in batches (the service refuses
  batch_id with `update_state: false` or a learner-owned `state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from espo_client.stop_rule import BatchStats, EspoParams, EspoState, update_state

from .errors import Conflict, InvalidRequest


@dataclass
class OpenBatch:
    batch_id: str
    frozen: EspoState
    """The state every call of this batch runs with."""
    params: EspoParams
    """Parameters of the batch's first call; they drive its update."""
    stats: BatchStats = field(default_factory=BatchStats)
    calls: int = 0
    """Calls that finished and are folded into `stats`."""
    running: int = 0
    """Calls of the batch still running."""


class StateLedger:
    """Holds the server-owned state and at most one open batch."""

    def __init__(self, params: EspoParams, initial: EspoState | None = None) -> None:
        self.state = initial or EspoState.fresh(params)
        self.open: OpenBatch | None = None

    def check_begin(self, batch_id: str | None) -> None:
        """Raise Conflict if a call of `batch_id` could not start now."""
        batch = self.open
        if batch_id is not None and batch is not None and batch.batch_id != batch_id and batch.running:
            raise Conflict(
                f"batch {batch.batch_id!r} still has {batch.running} call(s) running; a call of batch "
                f"{batch_id!r} would close it: wait for them",
                "batch_id",
            )

    def begin(self, batch_id: str | None, params: EspoParams) -> EspoState:
        """The state a starting call runs with."""
        if batch_id is None:
            return self.state
        self.check_begin(batch_id)
        if self.open is not None and self.open.batch_id != batch_id:
            self.commit()
        if self.open is None:
            self.open = OpenBatch(batch_id, frozen=self.state, params=params)
        self.open.running += 1
        return self.open.frozen

    def finish(self, batch_id: str | None, stats: BatchStats, params: EspoParams) -> EspoState | None:
        """Fold in a finished call. Returns the new state, or None while its batch stays open."""
        if batch_id is None:
            self.state = update_state(self.state, stats, params)
            return self.state
        batch = self._batch(batch_id)
        batch.running -= 1
        batch.calls += 1
        batch.stats = batch.stats.merge(stats)
        return None

    def abandon(self, batch_id: str | None) -> None:
        """A call that was cancelled or failed: its batch is as if it had never started."""
        if batch_id is None or self.open is None or self.open.batch_id != batch_id:
            return
        self.open.running -= 1
        if not self.open.running and not self.open.calls:
            self.open = None  # it opened the batch and nothing came of it

    def commit(self, batch_id: str | None = None) -> EspoState:
        """Close the open batch (if `batch_id` is given, only that one) and fold it in."""
        if self.open is None:
            return self.state
        if batch_id is not None and batch_id != self.open.batch_id:
            raise InvalidRequest(f"batch {batch_id!r} is not open (open: {self.open.batch_id!r})", "batch_id")
        if self.open.running:
            raise Conflict(
                f"batch {self.open.batch_id!r} still has {self.open.running} call(s) running: commit "
                "when they have returned",
                "batch_id",
            )
        batch, self.open = self.open, None
        self.state = update_state(self.state, batch.stats, batch.params)
        return self.state

    def set(self, state: EspoState) -> EspoState:
        """Replace the state (PUT /v1/espo/state); an open batch is dropped, not folded in."""
        if self.open is not None and self.open.running:
            raise Conflict(
                f"batch {self.open.batch_id!r} has {self.open.running} call(s) running with the current "
                "state: replace it when they have returned",
                "batch_id",
            )
        self.open = None
        self.state = state
        return state

    def _batch(self, batch_id: str) -> OpenBatch:
        assert self.open is not None and self.open.batch_id == batch_id, "a running call keeps its batch open"
        return self.open
