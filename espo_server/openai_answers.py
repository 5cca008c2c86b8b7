"""OpenAI answers from rollout trajectories: each trajectory one choice.

A choice has the trajectory's text (cut before the stop string that ended it, as OpenAI does), its
finish_reason, its logprobs in the completions or the chat shape, and the `espo` object (the whole
trajectory with its prompt's token ids). An answer in one JSON body holds every choice, the usage
and the rollout response; a streamed one is a server-sent chunk per choice, then a last chunk with
`choices: []`, the rollout response and (with `stream_options.include_usage`) the usage, then
`data: [DONE]`. The requests and routes are in openai_api.py and app.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from espo_client.openai_protocol import (
    FINISH_REASONS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatLogprobs,
    ChatMessageOut,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EspoChoice,
)
from espo_client.protocol import GroupEvent, RolloutResponse, Trajectory

from .errors import error_body
from .events import CallDone, summary
from .plan import CallPlan, TextCodec

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]


@dataclass
class OpenAICall:
    """A validated OpenAI request: its rollout plan and what the answer needs besides."""

    kind: Kind
    body: CompletionRequest | ChatCompletionRequest
    plan: CallPlan
    prompt_ids: list[list[int]]
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stops(self) -> list[str]:
        stop = self.body.stop
        return [stop] if isinstance(stop, str) else list(stop or [])


class Answers:
    """The answers of one OpenAI call: the JSON response, or (an `events.Encoder`) its SSE chunks."""

    def __init__(self, call: OpenAICall, text: TextCodec, model_name: str) -> None:
        self.call = call
        self.text = text
        self.common = {"id": call.id, "created": call.created, "model": model_name}
        self.chunk = CompletionChunk if call.kind == "completion" else ChatCompletionChunk

    def response(self, response: RolloutResponse) -> CompletionResponse | ChatCompletionResponse:
        model = CompletionResponse if self.call.kind == "completion" else ChatCompletionResponse
        return model(
            **self.common,
            choices=[self.choice(t) for t in response.trajectories],
            usage=self.usage(response),
            espo=summary(response),
        )

    def usage(self, response: RolloutResponse) -> CompletionUsage:
        prompt = sum(len(ids) for ids in self.call.prompt_ids)
        completion = response.usage.generated_tokens
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def choice(self, t: Trajectory) -> CompletionChoice | ChatChoice:
        call, body = self.call, self.call.body
        index = t.prompt_index * body.n + t.sample_index
        text = t.text or ""
        if t.end_reason == "eos" and call.stops:
            text = _cut_at_stop(text, call.stops)
        finish = FINISH_REASONS[t.end_reason]
        espo = EspoChoice(**t.model_dump(), prompt_token_ids=call.prompt_ids[t.prompt_index])
        if call.kind == "completion":
            assert isinstance(body, CompletionRequest)
            logprobs = self._completion_logprobs(t, body.logprobs) if body.logprobs is not None else None
            return CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish, espo=espo
            )
        assert isinstance(body, ChatCompletionRequest)
        chat_logprobs = self._chat_logprobs(t, body.top_logprobs or 0) if body.logprobs else None
        return ChatChoice(
            index=index,
            message=ChatMessageOut(content=text),
            logprobs=chat_logprobs,
            finish_reason=finish,
            espo=espo,
        )

    # ------------------------------------------------------------------ the stream's chunks

    def trajectory(self, trajectory: Trajectory) -> bytes:
        choice = self.choice(trajectory)
        if isinstance(choice, ChatChoice):
            choice = ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(role="assistant", content=choice.message.content),
                logprobs=choice.logprobs,
                finish_reason=choice.finish_reason,
                espo=choice.espo,
            )
        return sse_event(self.chunk(**self.common, choices=[choice]).model_dump_json())

    def group(self, event: GroupEvent) -> None:
        return None  # OpenAI streams have no group events; choices carry their prompt index

    def done(self, done: CallDone) -> bytes:
        options = self.call.body.stream_options
        usage = self.usage(done.response) if options and options.include_usage else None
        last = self.chunk(**self.common, choices=[], usage=usage, espo=done.summary)
        return sse_event(last.model_dump_json())

    def error(self, exc: Exception) -> bytes:
        log.exception("OpenAI stream failed")
        return sse_event(json.dumps({"error": error_body(exc).model_dump()}))

    # ------------------------------------------------------------------ logprobs

    def _top(self, t: Trajectory, k: int) -> list[list[tuple[int, float]]]:
        traces = t.traces
        if k <= 0 or traces is None or traces.top_token_ids is None or traces.top_logprobs is None:
            return [[] for _ in t.token_ids]
        return [
            list(zip(ids[:k], lps[:k], strict=True))
            for ids, lps in zip(traces.top_token_ids, traces.top_logprobs, strict=True)
        ]

    def _completion_logprobs(self, t: Trajectory, k: int) -> CompletionLogprobs:
        strings = self.text.token_strings(t.token_ids)
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        top = None
        if k > 0:
            top = [{self.text.token_strings([tok])[0]: lp for tok, lp in step} for step in self._top(t, k)]
        return CompletionLogprobs(
            tokens=strings, token_logprobs=t.logprobs, top_logprobs=top, text_offset=offsets
        )

    def _chat_logprobs(self, t: Trajectory, k: int) -> ChatLogprobs:
        strings = self.text.token_strings(t.token_ids)
        content = []
        for s, lp, step in zip(strings, t.logprobs, self._top(t, k), strict=True):
            top = []
            for token, token_lp in step:
                (ts,) = self.text.token_strings([token])
                top.append(ChatTopLogprob(token=ts, logprob=token_lp, bytes=list(ts.encode())))
            content.append(ChatLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then `data: [DONE]`."""
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk
    yield sse_event("[DONE]")


def sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """OpenAI leaves the stop string out of the text: cut at the first one found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text
