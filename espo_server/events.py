"""The events of a rollout call: what the service streams, and every transport encodes.

    TokenDelta        tokens of a running sample that are final (only a plan with token_events)
    TrajectoryEvent   a trajectory ended (with return_groups: its whole group did)
    GroupEvent        every trajectory of a prompt group has been sent
    CallDone          the call's answer, the whole RolloutResponse; always the last event

`RolloutService.stream` yields them. The transports write them through an `Encoder` each (HTTP's
NDJSON lines in app.py, the OpenAI routes' server-sent events in openai_answers.py, gRPC's
RolloutEvent messages in grpc_server.py), and `encode` is the one dispatch. A stream ends with the
response without its trajectories (`summary`): they were sent one by one. The routes that answer in
one JSON body take the whole response (`answer`).

A sample's TokenDeltas come before its TrajectoryEvent, in order and without gaps from token 0;
every token in them is in the final trajectory at the same position with the same raw logprob
(`Sample.safe_length`): tokens a stop later discards are never in one. The trajectory may hold
more tokens than its deltas did (those held back while a critic query was pending, or all of them
for a replayed call): the encoder sends the rest with the trajectory.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from espo_client.protocol import GroupEvent, RolloutResponse, Trajectory, TrajectoryEvent

T = TypeVar("T")


@dataclass(frozen=True)
class CallDone:
    """The call's answer: every trajectory, the usage, the state after."""

    response: RolloutResponse

    @property
    def summary(self) -> RolloutResponse:
        return summary(self.response)


@dataclass(frozen=True)
class TokenDelta:
    """Tokens `start`, `start + 1`, ... of one sample, final (see the module's docstring); also the
    tail of a finished trajectory (`tail`), so that one code writes both."""

    prompt_index: int
    sample_index: int
    start: int
    token_ids: list[int]
    logprobs: list[float]
    """Raw log-probabilities of the tokens."""
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    """The top-k at each step, when the call asked for the `top_logprobs` trace."""

    @classmethod
    def tail(cls, trajectory: Trajectory, start: int = 0) -> TokenDelta:
        """A trajectory's tokens from `start` on."""
        traces = trajectory.traces
        top_ids = traces.top_token_ids if traces is not None else None
        top_lps = traces.top_logprobs if traces is not None else None
        return cls(
            trajectory.prompt_index,
            trajectory.sample_index,
            start,
            trajectory.token_ids[start:],
            trajectory.logprobs[start:],
            None if top_ids is None else top_ids[start:],
            None if top_lps is None else top_lps[start:],
        )


CallEvent = TokenDelta | TrajectoryEvent | GroupEvent | CallDone


def summary(response: RolloutResponse) -> RolloutResponse:
    """The response without its trajectories: a stream's last event (they were sent before it), and
    the `espo` object of an OpenAI answer (its choices carry them)."""
    return response.model_copy(update={"trajectories": []})


class Encoder(Protocol[T]):
    """How one transport writes a call's events; None: the event is not sent."""

    def tokens(self, delta: TokenDelta) -> T | None: ...

    def trajectory(self, trajectory: Trajectory) -> T | None: ...

    def group(self, event: GroupEvent) -> T | None: ...

    def done(self, done: CallDone) -> T | None: ...

    def error(self, exc: Exception) -> T:
        """The call failed after its stream began: the stream's last item (or raise it on)."""
        ...


async def encode(events: AsyncIterator[CallEvent], encoder: Encoder[T]) -> AsyncIterator[T]:
    """A call's events as the transport's items. Closing this closes the call's stream at once (a
    client that went away): the call then aborts its samples."""
    try:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if isinstance(event, CallDone):
                    item = encoder.done(event)
                elif isinstance(event, GroupEvent):
                    item = encoder.group(event)
                elif isinstance(event, TokenDelta):
                    item = encoder.tokens(event)
                else:
                    item = encoder.trajectory(event.trajectory)
                if item is not None:
                    yield item
    except Exception as exc:  # cancellation (BaseException) goes through: the call aborts its samples
        yield encoder.error(exc)


async def answer(events: AsyncIterator[CallEvent]) -> RolloutResponse:
    """The call's whole answer. The stream is read to its end: a call releases what it holds (its
    run, the engine's gate) after its last event."""
    done: CallDone | None = None
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, CallDone):
                done = event
    assert done is not None, "a call's stream ends with its answer"
    return done.response


def replay(response: RolloutResponse) -> Iterator[CallEvent]:
    """A finished call's answer again, as its stream sent it (a retry with its request_id): the
    trajectories of each group and the group's event, then the answer."""
    groups: dict[tuple[str, int], list[Trajectory]] = {}
    for trajectory in response.trajectories:
        origin = trajectory.carried.request_id if trajectory.carried else response.request_id
        groups.setdefault((origin, trajectory.prompt_index), []).append(trajectory)
    for (origin, prompt_index), members in groups.items():
        yield from (TrajectoryEvent(trajectory=t) for t in members)
        if all(t.end_reason != "abort" for t in members):
            carried_from = None if origin == response.request_id else origin
            yield GroupEvent(prompt_index=prompt_index, sample_count=len(members), carried_from=carried_from)
    yield CallDone(response)
