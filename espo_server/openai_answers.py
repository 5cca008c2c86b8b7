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
from collections.abc import AsyncIterator
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
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EspoChoice,
)
from espo_client.protocol import GroupEvent, RolloutResponse, Trajectory

from .errors import error_body
from .events import CallDone, summary
from .openai_choices import ChoiceText, chat_logprobs, completion_logprobs, top_token_ids
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
    text: ChoiceText = field(default_factory=ChoiceText)
    """What decides each choice's text and stop_reason."""
    prompt_text: str | None = None
    """Chat: the rendered prompt (return_prompt_text)."""
    created: int = field(default_factory=lambda: int(time.time()))


class Answers:
    """The answers of one OpenAI call: the JSON response, or (an `events.Encoder`) its SSE chunks."""

    def __init__(self, call: OpenAICall, text: TextCodec, model_name: str) -> None:
        self.call = call
        self.text = text
        self.common = {"id": call.id, "created": call.created, "model": model_name}
        self.chunk = CompletionChunk if call.kind == "completion" else ChatCompletionChunk
        self.completion_tokens = 0
        """Tokens of the choices streamed so far (continuous_usage_stats)."""
        self.first = True

    def response(self, response: RolloutResponse) -> CompletionResponse | ChatCompletionResponse:
        call, body = self.call, self.call.body
        common = {**self.common, "usage": self.usage(response), "espo": summary(response)}
        choices = [self.choice(t) for t in response.trajectories]
        if call.kind == "completion":
            return CompletionResponse(**common, choices=choices)
        assert isinstance(body, ChatCompletionRequest)
        return ChatCompletionResponse(
            **common,
            choices=choices,
            prompt_token_ids=call.prompt_ids[0] if body.return_token_ids else None,
            prompt_text=call.prompt_text if body.return_prompt_text else None,
        )

    def usage(self, response: RolloutResponse) -> CompletionUsage:
        return self._usage(response.usage.generated_tokens)

    def _usage(self, completion_tokens: int) -> CompletionUsage:
        prompt = sum(len(ids) for ids in self.call.prompt_ids)
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
        )

    def choice(self, t: Trajectory) -> CompletionChoice | ChatChoice:
        call, body = self.call, self.call.body
        index = t.prompt_index * body.n + t.sample_index
        text, stop_reason = call.text.text_and_reason(t, self.text.tokenizer)
        finish = FINISH_REASONS[t.end_reason]
        prompt_ids = call.prompt_ids[t.prompt_index]
        espo = EspoChoice(**t.model_dump(), prompt_token_ids=prompt_ids)
        token_ids = list(t.token_ids) if body.return_token_ids else None
        if isinstance(body, CompletionRequest):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(t, body.logprobs, *self._strings(t, body.logprobs), call.text)
            return CompletionChoice(
                index=index,
                text=text,
                logprobs=logprobs,
                finish_reason=finish,
                stop_reason=stop_reason,
                token_ids=token_ids,
                prompt_token_ids=list(prompt_ids) if body.return_token_ids else None,
                espo=espo,
            )
        k = body.top_logprobs or 0
        return ChatChoice(
            index=index,
            message=ChatMessageOut(content=text),
            logprobs=chat_logprobs(t, k, *self._strings(t, k), call.text) if body.logprobs else None,
            finish_reason=finish,
            stop_reason=stop_reason,
            token_ids=token_ids,
            espo=espo,
        )

    def _strings(self, t: Trajectory, k: int) -> tuple[list[str], dict[int, str]]:
        """The sampled tokens decoded one by one, and the top-k tokens' strings."""
        others = sorted(top_token_ids(t, k))
        return self.text.token_strings(t.token_ids), dict(
            zip(others, self.text.token_strings(others), strict=True)
        )

    # ------------------------------------------------------------------ the stream's chunks

    def trajectory(self, trajectory: Trajectory) -> bytes:
        body = self.call.body
        options = body.stream_options
        self.completion_tokens += len(trajectory.token_ids)
        usage = self._usage(self.completion_tokens) if options and options.continuous_usage_stats else None
        choice = self.choice(trajectory)
        if isinstance(choice, CompletionChoice):
            chunk = CompletionChunk(**self.common, choices=[choice], usage=usage)
        else:
            assert isinstance(body, ChatCompletionRequest)
            delta = ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(role="assistant", content=choice.message.content),
                logprobs=choice.logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
                token_ids=choice.token_ids,
                espo=choice.espo,
            )
            first = self.first
            chunk = ChatCompletionChunk(
                **self.common,
                choices=[delta],
                usage=usage,
                prompt_token_ids=self.call.prompt_ids[0] if first and body.return_token_ids else None,
                prompt_text=self.call.prompt_text if first and body.return_prompt_text else None,
            )
        self.first = False
        return sse_event(chunk.model_dump_json())

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


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then `data: [DONE]`."""
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk
    yield sse_event("[DONE]")


def sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
