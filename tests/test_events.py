"""One event stream, encoded by every transport (espo_server/events.py): a call's events on the
scripted engine as NDJSON lines, OpenAI server-sent chunks and gRPC messages, and a failure after
the stream began as each transport's last word. The transports' end-to-end tests run them on vLLM."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import TypeAdapter

from espo_client.grpc_codec import from_message
from espo_client.openai_protocol import CompletionChunk, CompletionRequest
from espo_client.protocol import (
    GroupEvent,
    Prompt,
    RolloutRequest,
    RolloutResponse,
    RolloutStreamEvent,
    Trajectory,
    TrajectoryEvent,
)
from espo_server.app import NdjsonLines
from espo_server.critic import CriticError
from espo_server.events import CallDone, TokenDelta, answer, encode, replay
from espo_server.grpc_server import RolloutEvents
from espo_server.openai_answers import Answers, OpenAICall, sse_events
from espo_server.plan import TextCodec
from tests.fakes import FakeCritic, FakeEngine, FakeTokenizer, run, service

REQUEST = RolloutRequest(prompts=[Prompt(token_ids=[5, 6]), Prompt(token_ids=[7])], n=2, max_tokens=6)


def events(token_events: bool = False) -> list:
    svc = service(FakeEngine(length=6), FakeCritic())

    async def go():
        plan = svc.plan(REQUEST)
        plan.token_events = token_events
        return [event async for event in svc.stream(plan)]

    return run(go())


async def scripted(items: list, fail: Exception | None = None):
    for item in items:
        yield item
    if fail is not None:
        raise fail


def encoded(items: list, encoder, fail: Exception | None = None) -> list:
    async def go():
        return [item async for item in encode(scripted(items, fail), encoder)]

    return run(go())


def openai_answers() -> Answers:
    body = CompletionRequest(model="m", prompt=[[5, 6], [7]], n=2, stream=True)
    call = OpenAICall("completion", body, None, [[5, 6], [7]], "cmpl-x", created=1)  # type: ignore[arg-type]
    return Answers(call, TextCodec(FakeTokenizer()), "m")


def test_a_call_streams_its_trajectories_and_groups_then_its_whole_answer():
    stream = events()
    done = stream[-1]
    assert isinstance(done, CallDone) and not any(isinstance(e, CallDone) for e in stream[:-1])
    sent = [e.trajectory for e in stream if isinstance(e, TrajectoryEvent)]
    assert sorted((t.prompt_index, t.sample_index) for t in sent) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(e.prompt_index for e in stream if isinstance(e, GroupEvent)) == [0, 1]
    assert len(done.response.trajectories) == 4 and done.summary.trajectories == []
    assert done.summary.usage == done.response.usage
    assert run(answer(scripted(stream))) is done.response
    replayed = list(replay(done.response))  # a retry's stream: the same events, groups together
    kinds = [type(e).__name__ for e in replayed]
    assert kinds == ["TrajectoryEvent"] * 2 + ["GroupEvent"] + ["TrajectoryEvent"] * 2 + [
        "GroupEvent",
        "CallDone",
    ]
    assert replayed[-1].response is done.response


def test_a_plan_with_token_events_gets_each_samples_final_tokens_before_its_trajectory():
    stream = events(token_events=True)
    assert not any(isinstance(e, TokenDelta) for e in events())  # only when asked
    for t in [e.trajectory for e in stream if isinstance(e, TrajectoryEvent)]:
        key = (t.prompt_index, t.sample_index)
        mine = [e for e in stream if isinstance(e, TokenDelta) and (e.prompt_index, e.sample_index) == key]
        starts = [sum(len(d.token_ids) for d in mine[:i]) for i in range(len(mine))]
        assert mine and [d.start for d in mine] == starts  # in order, no gaps
        assert [tok for d in mine for tok in d.token_ids] == t.token_ids  # rule none: nothing held back
        assert [lp for d in mine for lp in d.logprobs] == t.logprobs
        ended = next(i for i, e in enumerate(stream) if isinstance(e, TrajectoryEvent) and e.trajectory is t)
        assert all(stream.index(d) < ended for d in mine)
    # NDJSON and gRPC send the trajectories, not the deltas
    assert len(encoded(stream, NdjsonLines())) == len(encoded(stream, RolloutEvents())) == 4 + 2 + 1


def test_ndjson_lines_are_the_protocols_stream_events():
    stream = events()
    lines = [TypeAdapter(RolloutStreamEvent).validate_json(line) for line in encoded(stream, NdjsonLines())]
    assert [line.type for line in lines] == [
        "trajectory" if isinstance(e, TrajectoryEvent) else e.type if isinstance(e, GroupEvent) else "done"
        for e in stream
    ]
    assert lines[-1].response.trajectories == [] and lines[-1].response.usage.trajectories == 4


def test_grpc_messages_carry_the_same_events():
    stream = events()
    messages = encoded(stream, RolloutEvents())
    assert [m.WhichOneof("event") for m in messages] == [
        "trajectory" if isinstance(e, TrajectoryEvent) else "group" if isinstance(e, GroupEvent) else "done"
        for e in stream
    ]
    first = next(e for e in stream if isinstance(e, TrajectoryEvent))
    assert from_message(messages[stream.index(first)].trajectory, Trajectory) == first.trajectory
    done = from_message(messages[-1].done, RolloutResponse)
    assert done.trajectories == [] and done.usage == stream[-1].response.usage


def test_openai_chunks_leave_out_group_events_and_end_with_the_rollout_response():
    stream = events()

    async def go():
        return [item async for item in sse_events(encode(scripted(stream), openai_answers()))]

    sent = run(go())
    assert sent[-1] == b"data: [DONE]\n\n"
    chunks = [CompletionChunk.model_validate_json(item.removeprefix(b"data: ")) for item in sent[:-1]]
    assert len(chunks) == 5  # four choices, then the last chunk
    assert sorted(c.choices[0].index for c in chunks[:-1]) == [0, 1, 2, 3]  # prompt_index * n + sample
    assert chunks[-1].choices == [] and chunks[-1].espo.trajectories == []


@pytest.mark.parametrize("transport", ["ndjson", "openai"])
def test_a_failure_after_the_stream_began_is_its_last_event(transport):
    stream = events()[:1]
    failure = CriticError("critic down")
    if transport == "ndjson":
        *sent, last = encoded(stream, NdjsonLines(), failure)
        error = TypeAdapter(RolloutStreamEvent).validate_json(last)
        assert len(sent) == 1 and error.type == "error"
        assert (error.error.type, error.error.code) == ("critic_unavailable", 503)
    else:
        *sent, last = encoded(stream, openai_answers(), failure)
        body = json.loads(last.removeprefix(b"data: "))
        assert len(sent) == 1 and body["error"]["type"] == "critic_unavailable"


def test_grpc_raises_a_failure_on_to_end_the_call_with_its_status():
    with pytest.raises(CriticError):
        encoded(events()[:1], RolloutEvents(), CriticError("critic down"))


def test_cancellation_is_not_an_error_event():
    async def go():
        task = asyncio.ensure_future(
            encode(scripted([], asyncio.CancelledError()), NdjsonLines()).__anext__()
        )
        await asyncio.wait({task})
        return task

    assert run(go()).cancelled()  # it goes through: the call aborts its samples
