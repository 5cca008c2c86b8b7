"""Fakes of the engine and the critic, for tests of the service's control flow without vLLM.

`FakeEngine` implements `espo_server.engine.Engine`, the interface the service needs from a policy
engine (tests/test_fakes.py checks it against that Protocol, as it does the real `PolicyEngine`). Its
streams are scripted: every token has raw logprob -9 and the greedy token logprob 0 (regret 9).
These fakes test pure control flow only; the tests against a real server run the same code on vLLM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from espo_client.protocol import EspoState
from espo_server.config import ServerConfig
from espo_server.critic import CriticError
from espo_server.engine import ENGINE_DEAD_MESSAGE, GenerationParams, TokenChunk
from espo_server.errors import EngineDead
from espo_server.gate import ReadWriteGate
from espo_server.plan import Verifier
from espo_server.service import RolloutService
from espo_server.stream_readers import StreamReaders

# Every token has regret 9 (sampled -9, top 0): with this state gn = clip((9-1)/1, -5, 5) = 5,
# z_t = 5 * (1 - 0.9^(t+1)): z > beta*eps = 0.5 from t = 0 on.
HOT = EspoState(mu=1.0, var=1.0, beta=25.0, warm=True, initialised=True, batches=3)


class FakeTokenizer:
    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 50 + 4 for c in text]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """Streams `length` tokens one per chunk, `delay` seconds apart; records aborts. `lengths` maps a
    request id's prefix to its own length (per-sample lengths). `abort(id)` ends a stream as vLLM's
    does: a last chunk with finish_reason "abort"."""

    def __init__(
        self, length: int = 40, delay: float = 0.002, finish: str = "length", lengths: dict | None = None
    ) -> None:
        self.length, self.delay, self.finish, self.lengths = length, delay, finish, lengths or {}
        self.tokenizer = FakeTokenizer()
        self.vocab_size, self.max_model_len, self.eos_token_id = 64, 512, 2
        self.max_num_seqs = self.max_num_batched_tokens = None
        self.policy_version = 0
        self.dead = False
        self.broken: str | None = None
        self.model = self.weights_path = "fake"
        self.gate = ReadWriteGate()
        self.readers = StreamReaders()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.prompts: dict[str, list[int]] = {}
        self._abort: set[str] = set()
        self._prompt_len: dict[str, int] = {}

    def _length(self, request_id: str) -> int:
        for prefix, length in self.lengths.items():
            if request_id.startswith(prefix):
                return length
        return self.length

    async def abort(self, request_id: str) -> None:
        self._abort.add(request_id)

    async def reload_weights(self, path: str, version: int) -> float:
        self.policy_version, self.weights_path = version, path
        return 0.0

    async def check_health(self) -> None:
        pass

    def fail_streams(self) -> None:
        self.readers.fail(lambda: EngineDead(ENGINE_DEAD_MESSAGE))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[TokenChunk]:
        prompt = prompt_token_ids
        done = False
        self.prompts[request_id] = list(prompt)
        base = request_id.split("-r")[0]  # a resumed sample's request: "<id>-r<k>"
        offset = len(prompt) - self._prompt_len.setdefault(base, len(prompt))  # tokens it already has
        try:
            n = min(self._length(base) - offset, params.max_tokens)
            for i in range(n):
                with self.readers.reading():
                    await asyncio.sleep(self.delay)
                if request_id in self._abort:
                    done = True
                    self.aborted.append(request_id)
                    yield TokenChunk([], [], [], finish_reason="abort")
                    return
                last = i == n - 1
                if last:
                    done = True
                    self.finished.append(request_id)
                token = 10 + (offset + i) % 40
                yield TokenChunk([token], [-9.0], [0.0], finish_reason=self.finish if last else None)
        finally:
            if not done:
                self.aborted.append(request_id)


class FakeCritic:
    name = "fake"

    def __init__(self, value: float = 0.0, delay: float = 0.0, fail: bool = False) -> None:
        self.value, self.delay, self.fail = value, delay, fail
        self.prefixes: list[list[int]] = []

    async def values(self, prefixes):
        self.prefixes.extend(list(p) for p in prefixes)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise CriticError("critic down")
        return [self.value for _ in prefixes]

    async def check(self) -> None:
        if self.fail:
            raise CriticError("critic down")


class HeldCritic(FakeCritic):
    """A critic that answers only once `release` is set; `asked` is set by the first query."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__(value=value)
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def values(self, prefixes):
        self.prefixes.extend(list(p) for p in prefixes)
        self.asked.set()
        await self.release.wait()
        return [self.value for _ in prefixes]


class PausingEngine(FakeEngine):
    """FakeEngine whose streams stop after `pause_at` tokens until `resume` is set; `paused` is set
    once a stream has sent its `pause_at`-th token and its consumer asked for the next."""

    def __init__(self, pause_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pause_at = pause_at
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, params):
        sent = 0
        async for chunk in super().generate(request_id, prompt_token_ids, params):
            if sent == self.pause_at:
                self.paused.set()
                await self.resume.wait()
            sent += len(chunk.token_ids)
            yield chunk


class GatedEngine(FakeEngine):
    """FakeEngine whose samples generate only once `release` is set: calls stay running until then."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.release = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, params):
        with self.readers.reading():
            await self.release.wait()
        async for chunk in super().generate(request_id, prompt_token_ids, params):
            yield chunk


def service(engine, critic, verifier: Verifier | None = None, **cfg) -> RolloutService:
    return RolloutService(engine, critic, ServerConfig(model="fake", **cfg), verifier)


def run(coro):
    return asyncio.run(coro)
