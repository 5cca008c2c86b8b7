"""The server-owned ESPO state and its batches. Pure bookkeeping: no vLLM, no HTTP, no awaits.

Causality: the state a call runs with is read when the call starts and never changes during the
batch. A call without `batch_id` is a batch of its own: its statistics are folded in when it ends.
Calls sharing a `batch_id` all run with the state read when that batch opened; their statistics
accumulate and are folded in once, by `commit` (POST /v1/espo/commit) or by the first call that
names another batch_id. The maths is `espo_client.stop_rule.update_state`, the same code a
learner that owns its state runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from espo_client.stop_rule import BatchStats, EspoParams, EspoState, update_state

log = logging.getLogger(__name__)


@dataclass
class OpenBatch:
    batch_id: str
    frozen: EspoState
    """The state every call of this batch runs with."""
    params: EspoParams
    """Parameters of the batch's first call; they drive its update."""
    stats: BatchStats = field(default_factory=BatchStats)
    calls: int = 0


class StateLedger:
    """Holds the server-owned state and at most one open batch."""

    def __init__(self, params: EspoParams, initial: EspoState | None = None) -> None:
        self.state = initial or EspoState.fresh(params)
        self.open: OpenBatch | None = None

    def begin(self, batch_id: str | None, params: EspoParams) -> EspoState:
        """The state a starting call runs with."""
        if batch_id is None:
            return self.state
        if self.open is not None and self.open.batch_id != batch_id:
            self.commit()
        if self.open is None:
            self.open = OpenBatch(batch_id, frozen=self.state, params=params)
        self.open.calls += 1
        return self.open.frozen

    def finish(self, batch_id: str | None, stats: BatchStats, params: EspoParams) -> EspoState | None:
        """Fold in a finished call. Returns the new state, or None while its batch stays open."""
        if batch_id is not None and self.open is not None and self.open.batch_id == batch_id:
            self.open.stats = self.open.stats.merge(stats)
            return None
        if batch_id is not None:
            # Its batch was committed while this call ran: fold it in as a batch of its own
            # rather than lose it.
            log.warning("call of batch %r finished after the batch was committed", batch_id)
        self.state = update_state(self.state, stats, params)
        return self.state

    def commit(self, batch_id: str | None = None) -> EspoState:
        """Close the open batch (if `batch_id` is given, only that one) and fold it in."""
        if self.open is None:
            return self.state
        if batch_id is not None and batch_id != self.open.batch_id:
            raise KeyError(f"batch {batch_id!r} is not open (open: {self.open.batch_id!r})")
        batch, self.open = self.open, None
        self.state = update_state(self.state, batch.stats, batch.params)
        return self.state

    def set(self, state: EspoState) -> EspoState:
        """Replace the state (PUT /v1/espo/state); an open batch is dropped, not folded in."""
        self.open = None
        self.state = state
        return state
