"""OpenAI streams send tokens as they become final: the service on the scripted engine and critic
(tests/fakes.py), each step driven by an event (a paused engine, a critic that answers when told),
and the text streamer on real tokenizers. The same streams on vLLM: tests/test_openai_api.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import anyio
import pytest

from espo_client.openai_protocol import CompletionRequest
from espo_client.protocol import Trajectory
from espo_server.openai_answers import KEEP_ALIVE
from espo_server.openai_api import OpenAIServing
from espo_server.openai_choices import ChoiceText, TextStream
from espo_server.tiny_model import EOS_ID, build_tokenizer
from tests.fakes import HOT, FakeCritic, HeldCritic, PausingEngine, run
from tests.fakes import service as fake_service

BOUND_S = 30.0
"""Generous bound of every wait on a condition (a hang fails instead of running into CI's limit)."""


def service(engine, critic, **cfg):
    """The service on the fakes; the critic's timeout beyond every wait here (a held answer is late
    on purpose, not failed)."""
    return fake_service(engine, critic, critic_timeout_s=2 * BOUND_S, **cfg)


def completion(**kw) -> CompletionRequest:
    base = dict(
        prompt=[5, 6, 7], max_tokens=20, stream=True, return_token_ids=True, logprobs=0,
        stop_rule="espo", state=dataclasses.asdict(HOT), rule_params={"min_tokens": 3, "critic_stride": 50},
    )  # fmt: skip
    return CompletionRequest(**{**base, **kw})


class Stream:
    """An OpenAI stream of the service, read in a task: its chunks and comments as they come."""

    def __init__(self, svc, body: CompletionRequest) -> None:
        self.oai = OpenAIServing(svc, svc.config)
        self.events = self.oai.sse(self.oai.completion_call(body))
        self.chunks: list[dict] = []
        self.keep_alives = 0
        self.changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.events:
            if raw == KEEP_ALIVE:
                self.keep_alives += 1
            else:
                data = raw.decode().removeprefix("data: ").strip()
                if data != "[DONE]":
                    self.chunks.append(json.loads(data))
            self.changed.set()

    async def until(self, condition) -> None:
        """Wait until `condition()` holds (bounded)."""
        async with asyncio.timeout(BOUND_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def choices(self, index: int = 0) -> list[dict]:
        return [c for chunk in self.chunks for c in chunk["choices"] if c["index"] == index]

    def token_ids(self, index: int = 0) -> list[int]:
        return [t for c in self.choices(index) for t in c["token_ids"] or []]

    def text(self, index: int = 0) -> str:
        return "".join(c["text"] for c in self.choices(index))

    def ended(self, index: int = 0) -> bool:
        return any(c["finish_reason"] is not None for c in self.choices(index))


def test_a_rule_without_critic_holds_nothing_back():
    """Rule none: the first 10 tokens are sent while the engine is paused, before the choice ends."""

    async def go():
        engine = PausingEngine(pause_at=10, length=20)
        stream = Stream(service(engine, FakeCritic()), completion(stop_rule="none"))
        await stream.until(lambda: len(stream.token_ids()) == 10)
        assert not stream.ended()  # it cannot: the engine stops at its 11th token until resumed
        await asyncio.wait_for(engine.paused.wait(), BOUND_S)
        engine.resume.set()
        await asyncio.wait_for(stream.task, BOUND_S)
        return stream

    stream = run(go())
    (last,) = [c for c in stream.choices() if c["finish_reason"] is not None]
    assert last is stream.choices()[-1] and last["espo"]["end_reason"] == "length"
    assert stream.token_ids() == last["espo"]["token_ids"] and len(stream.token_ids()) == 20
    assert stream.text() == "".join(chr(t) for t in last["espo"]["token_ids"])
    offsets = [o for c in stream.choices() for o in c["logprobs"]["text_offset"]]
    assert offsets == list(range(20))  # one character per token, offsets across chunks
    first, *rest = stream.choices()
    assert first["prompt_token_ids"] == [5, 6, 7] and all(c["prompt_token_ids"] is None for c in rest)


def test_text_held_back_for_a_stop_string_is_sent_later():
    """With a stop string of 3 characters the last 2 wait (a stop may begin there); without
    logprobs or token ids a chunk whose text is all held back is not sent, and the next ones go on."""

    async def go():
        engine = PausingEngine(pause_at=10, length=20)
        body = completion(stop_rule="none", stop=["abc"], logprobs=None, return_token_ids=None)
        stream = Stream(service(engine, FakeCritic()), body)
        await stream.until(lambda: len(stream.text()) == 8)
        await asyncio.wait_for(engine.paused.wait(), BOUND_S)
        assert not stream.ended()
        engine.resume.set()
        await asyncio.wait_for(stream.task, BOUND_S)
        return stream

    stream = run(go())
    espo = stream.choices()[-1]["espo"]
    assert stream.text() == "".join(chr(t) for t in espo["token_ids"]) and len(espo["token_ids"]) == 20
    assert all(c["text"] for c in stream.choices()[:-1])  # no empty chunk before the last


def test_tokens_a_pending_critic_query_may_cut_are_held_back_and_never_sent():
    """espo, a hot state: the critic is asked at step 3 and answers (stop) only after the engine has
    generated 10 tokens. Until then only tokens 0..3 are sent; the 6 discarded ones never are."""

    async def go():
        engine, critic = PausingEngine(pause_at=10, length=20), HeldCritic(value=0.0)
        stream = Stream(service(engine, critic), completion())
        await asyncio.wait_for(asyncio.gather(critic.asked.wait(), engine.paused.wait()), BOUND_S)
        await stream.until(lambda: len(stream.token_ids()) == 4)
        held = list(stream.token_ids())
        critic.release.set()
        await asyncio.wait_for(stream.task, BOUND_S)
        return stream, held

    stream, held = run(go())
    (last,) = [c for c in stream.choices() if c["finish_reason"] is not None]
    espo = last["espo"]
    assert (espo["end_reason"], espo["stop_step"], espo["discarded_tokens"]) == ("espo_stop", 3, 6)
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", "espo_stop")
    assert held == espo["token_ids"] == stream.token_ids()  # every token sent is kept, none discarded
    assert last["token_ids"] == []  # nothing was left to send at the end
    logprobs = [lp for c in stream.choices() for lp in c["logprobs"]["token_logprobs"]]
    assert logprobs == espo["logprobs"]


def test_shadow_mode_holds_nothing_back():
    """In shadow mode a pending query cuts nothing: tokens past it are sent while the critic thinks."""

    async def go():
        engine, critic = PausingEngine(pause_at=10, length=12), HeldCritic(value=0.0)
        stream = Stream(service(engine, critic), completion(shadow=True))
        await stream.until(lambda: len(stream.token_ids()) == 10)
        assert critic.asked.is_set() and not critic.release.is_set()
        critic.release.set()
        engine.resume.set()
        await asyncio.wait_for(stream.task, BOUND_S)
        return stream

    stream = run(go())
    espo = stream.choices()[-1]["espo"]
    assert espo["end_reason"] == "length" and espo["shadow_stop_step"] == 3
    assert stream.token_ids() == espo["token_ids"]


def test_keep_alive_comments_flow_while_the_critic_is_slow():
    """Nothing can be sent while the critic holds its answer (tokens past step 3 are held back) and
    the engine is paused: keep-alive comments come instead; the critic answers only after one."""

    async def go():
        engine, critic = PausingEngine(pause_at=10, length=20), HeldCritic(value=0.0)
        stream = Stream(service(engine, critic, sse_keepalive_s=0.01), completion())
        await asyncio.wait_for(critic.asked.wait(), BOUND_S)
        seen = stream.keep_alives
        await stream.until(lambda: stream.keep_alives > seen)
        assert not stream.ended()
        critic.release.set()
        await asyncio.wait_for(stream.task, BOUND_S)
        return stream

    stream = run(go())
    assert stream.keep_alives >= 1 and stream.choices()[-1]["espo"]["end_reason"] == "espo_stop"
    assert stream.chunks[-1]["choices"] == [] and stream.chunks[-1]["espo"]["usage"]["stopped"] == 1


@pytest.mark.parametrize("how", ["task group cancelled", "iterator closed"])
def test_a_client_that_drops_the_stream_aborts_its_samples(how):
    """The server sees a client go as its response's task group cancelled (Starlette over uvicorn:
    every later wait of the task is cancelled again) or as the iterator closed: either way each
    sample's engine request is aborted before the stream's iterator returns."""

    async def go():
        engine = PausingEngine(pause_at=5, length=100)
        svc = service(engine, FakeCritic(), sse_keepalive_s=0.01)
        oai = OpenAIServing(svc, svc.config)
        events = oai.sse(oai.completion_call(completion(n=4, stop_rule="none")))
        if how == "iterator closed":
            await anext(events)
            await events.aclose()
            return engine, svc
        first = asyncio.Event()

        async def read():
            async for _ in events:
                first.set()

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await first.wait()
            group.cancel_scope.cancel()
        return engine, svc

    engine, svc = run(go())
    assert len(engine.aborted) == 4 and not engine.finished
    assert svc.admission.inflight == 0


# ---------------------------------------------------------------------- the text streamer


def streamed(stream: TextStream, ids: list[int], final: str) -> tuple[str, list[str]]:
    """Feed `ids` one by one; the whole streamed text and what was sent after each token."""
    parts = [stream.feed([t]) for t in ids]
    return "".join(parts) + stream.rest(final), parts


@pytest.mark.parametrize(
    "text, end, options",
    [
        ("7+5=12", "eos", {}),
        ("7+5=12", "eos", {"include_stop_str_in_output": True, "skip_special_tokens": False}),
        ("7+5=12+3", "eos", {"stops": ("=1",)}),
        ("7+5=12+3", "eos", {"stops": ("=1", "+5="), "include_stop_str_in_output": True}),
        ("7+5=12+3", "length", {"stops": ("9",)}),
        ("7+5=12", "espo_stop", {"skip_special_tokens": False}),
    ],
)
def test_streamed_text_is_always_a_prefix_and_ends_as_the_choice(text, end, options):
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(text) + ([EOS_ID] if end == "eos" and "stops" not in options else [])
    if "stops" in options and end == "eos":  # the engine ends at the token completing a stop string
        cut = min(i for i in range(1, len(text) + 1) if any(s in text[:i] for s in options["stops"]))
        ids = tokenizer.encode(text[:cut])
    choice = ChoiceText(eos_token_id=EOS_ID, **options)
    t = Trajectory(
        prompt_index=0, sample_index=0, token_ids=ids, logprobs=[-1.0] * len(ids), end_reason=end,
        policy_version=0,
    )  # fmt: skip
    final, _ = choice.text_and_reason(t, tokenizer)
    whole, parts = streamed(TextStream(choice, tokenizer), ids, final)
    assert whole == final
    for i in range(len(parts)):
        assert final.startswith("".join(parts[: i + 1]))


def test_an_incomplete_utf8_character_is_held_back():
    """A byte-level BPE tokenizer: 'é' is two byte tokens; the first alone decodes to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False)
    ids = tokenizer.encode("aé b", add_special_tokens=False)
    assert len(ids) == 5 and tokenizer.decode(ids[:2]) == "a\ufffd"
    stream = TextStream(ChoiceText(), tokenizer)
    parts = [stream.feed([t]) for t in ids]
    assert parts == ["a", "", "é", " ", "b"]
