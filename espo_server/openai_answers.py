"""OpenAI answers from rollout trajectories: each trajectory one choice.

A choice has the trajectory's text (as vLLM words it: openai_choices.py), its finish_reason and
stop_reason, its logprobs in the completions or the chat shape, and the `espo` object (the whole
trajectory with its prompt's token ids). An answer in one JSON body holds every choice, the usage
and the rollout response.

A streamed answer sends each choice's final tokens as they come (events.TokenDelta): chunks with
the next text, the logprobs and (return_token_ids) the ids of those tokens; the role and the
prompt's ids on a choice's first chunk. Each choice ends with exactly one chunk that carries the
rest (what was held back), its finish_reason, stop_reason and `espo` object. Then a last chunk
with `choices: []`, the rollout response and (with `stream_options.include_usage`) the usage, then
`data: [DONE]`; `: keep-alive` comments while nothing else is sent. The requests and routes are in
openai_api.py and app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from espo_client.openai_protocol import (
    FINISH_REASONS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EspoChoice,
)
from espo_client.protocol import GroupEvent, RolloutResponse, Trajectory

from .errors import error_body
from .events import CallDone, TokenDelta, summary
from .openai_choices import ChoiceText, TextStream, chat_logprobs, completion_logprobs, top_token_ids
from .plan import CallPlan, TextCodec

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
T = TypeVar("T")

KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment: clients ignore it; proxies see bytes flow."""


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


@dataclass
class _Streamed:
    """What a streamed choice has sent so far."""

    text: TextStream
    chunks: int = 0
    tokens: int = 0
    """Tokens of the choice written (their text may be held back still)."""
    offset: int = 0
    """Completions' text_offset: the characters of the sent tokens' strings."""


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
        self.streamed: dict[int, _Streamed] = {}
        self.ended: set[int] = set()

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
        body = self.call.body
        text, stop_reason = self.call.text.text_and_reason(t, self.text.tokenizer)
        tokens = TokenDelta.tail(t)
        fields = {
            "index": t.prompt_index * body.n + t.sample_index,
            "logprobs": self._logprobs(tokens, 0),
            "finish_reason": FINISH_REASONS[t.end_reason],
            "stop_reason": stop_reason,
            "token_ids": list(t.token_ids) if body.return_token_ids else None,
            "espo": EspoChoice(**t.model_dump(), prompt_token_ids=self.call.prompt_ids[t.prompt_index]),
        }
        if isinstance(body, CompletionRequest):
            prompt_ids = self.call.prompt_ids[t.prompt_index] if body.return_token_ids else None
            return CompletionChoice(**fields, text=text, prompt_token_ids=prompt_ids)
        return ChatChoice(**fields, message=ChatMessageOut(content=text))

    def _logprobs(self, tokens: TokenDelta, offset: int) -> CompletionLogprobs | ChatLogprobs | None:
        """The logprobs of `tokens` in the route's shape, if the request asked for them."""
        body, text = self.call.body, self.call.text
        if isinstance(body, CompletionRequest):
            if body.logprobs is None:
                return None
            k = body.logprobs
            return completion_logprobs(tokens, k, *self._strings(tokens, k), text, offset=offset)
        if not body.logprobs:
            return None
        k = body.top_logprobs or 0
        return chat_logprobs(tokens, k, *self._strings(tokens, k), text)

    def _strings(self, tokens: TokenDelta, k: int) -> tuple[list[str], dict[int, str]]:
        """The sampled tokens decoded one by one, and the top-k tokens' strings."""
        others = sorted(top_token_ids(tokens, k))
        return self.text.token_strings(tokens.token_ids), dict(
            zip(others, self.text.token_strings(others), strict=True)
        )

    # ------------------------------------------------------------------ the stream's chunks

    def tokens(self, delta: TokenDelta) -> bytes | None:
        """A choice's next final tokens: their text (what may be sent yet), logprobs and ids."""
        index = delta.prompt_index * self.call.body.n + delta.sample_index
        if index in self.ended:
            return None
        sent = self._streamed(index)
        if delta.start != sent.tokens:  # the call sends each token once, in order
            log.error("choice %d: tokens from %d, expected from %d", index, delta.start, sent.tokens)
            return None
        text = sent.text.feed(delta.token_ids)
        return self._chunk(index, delta, text, sent)

    def trajectory(self, trajectory: Trajectory) -> bytes:
        """A choice's last chunk: the rest of its tokens and text, its finish and its `espo` object."""
        body = self.call.body
        index = trajectory.prompt_index * body.n + trajectory.sample_index
        self.ended.add(index)
        sent = self._streamed(index)
        final, stop_reason = self.call.text.text_and_reason(trajectory, self.text.tokenizer)
        end = {
            "finish_reason": FINISH_REASONS[trajectory.end_reason],
            "stop_reason": stop_reason,
            "espo": EspoChoice(
                **trajectory.model_dump(), prompt_token_ids=self.call.prompt_ids[trajectory.prompt_index]
            ),
        }
        rest = TokenDelta.tail(trajectory, sent.tokens)
        return self._chunk(index, rest, sent.text.rest(final), sent, end)

    def _streamed(self, index: int) -> _Streamed:
        if index not in self.streamed:
            self.streamed[index] = _Streamed(TextStream(self.call.text, self.text.tokenizer))
        return self.streamed[index]

    def _chunk(self, index: int, tokens: TokenDelta, text: str, sent: _Streamed, end: dict | None = None):
        """One choice's chunk; None when it would say nothing (no text, logprobs, ids or end)."""
        body = self.call.body
        logprobs = self._logprobs(tokens, sent.offset)
        ids = list(tokens.token_ids) if body.return_token_ids else None
        sent.tokens += len(tokens.token_ids)
        self.completion_tokens += len(tokens.token_ids)
        if isinstance(logprobs, CompletionLogprobs):
            sent.offset += sum(len(s) for s in self.text.token_strings(tokens.token_ids))
        if end is None and not text and logprobs is None and not ids:
            return None  # its text is held back, and nothing else was asked for
        first = sent.chunks == 0
        sent.chunks += 1
        options = body.stream_options
        usage = self._usage(self.completion_tokens) if options and options.continuous_usage_stats else None
        fields = {"index": index, "logprobs": logprobs, "token_ids": ids, **(end or {})}
        if isinstance(body, CompletionRequest):
            prompt_ids = None
            if first and body.return_token_ids:
                prompt_ids = self.call.prompt_ids[tokens.prompt_index]
            choice = CompletionChunkChoice(**fields, text=text, prompt_token_ids=prompt_ids)
            chunk = CompletionChunk(**self.common, choices=[choice], usage=usage)
        else:
            delta = ChatDelta(role="assistant" if first else None, content=text)
            choice = ChatChunkChoice(**fields, delta=delta)
            head = self.first
            chunk = ChatCompletionChunk(
                **self.common,
                choices=[choice],
                usage=usage,
                prompt_token_ids=self.call.prompt_ids[0] if head and body.return_token_ids else None,
                prompt_text=self.call.prompt_text if head and body.return_prompt_text else None,
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


async def sse_events(chunks: AsyncIterator[bytes], keep_alive_s: float = 0.0) -> AsyncIterator[bytes]:
    """The chunks, a keep-alive comment after every `keep_alive_s` seconds without one (0: none),
    then `data: [DONE]`."""
    async for chunk in with_heartbeat(chunks, keep_alive_s, KEEP_ALIVE):
        yield chunk
    yield sse_event("[DONE]")


async def with_heartbeat(items: AsyncIterator[T], every_s: float, beat: T) -> AsyncIterator[T]:
    """`items`, and `beat` after every `every_s` seconds in which none came (0: never). Closing or
    cancelling this cancels the item being waited for and closes `items` (a client gone: the call
    aborts its samples)."""
    waiting: asyncio.Future[T] | None = None
    try:
        while True:
            waiting = waiting or asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({waiting}, timeout=every_s if every_s > 0 else None)
            if not done:
                yield beat
                continue
            arrived, waiting = waiting, None
            try:
                item = arrived.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if waiting is not None:
            waiting.cancel()
            while not waiting.done():  # a cancelled task group cancels every wait of ours again
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({waiting})
        await items.aclose()  # type: ignore[attr-defined]  # after the waiting item: it is not running


def sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
