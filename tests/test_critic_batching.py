"""The critic batcher on scripted critics (no vLLM): gathering, bounds, one timeout per batch,
failures flagged on every trajectory a batch held, versions and critic tokens in the response.

tests/test_critic_scale.py runs the same paths on real vLLM critics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from espo_client.protocol import Prompt, RolloutRequest
from espo_server.config import ServerConfig
from espo_server.critic import CriticAnswer, CriticError
from espo_server.critic_batcher import CriticBatcher
from espo_server.critic_http import VllmPoolingCritic
from espo_server.errors import InvalidRequest
from espo_server.service import RolloutService
from tests.fakes import HOT, FakeEngine


class ScriptedCritic:
    """Answers V = len(prefix) / 100, records each call's batch; version and cached tokens scripted."""

    name = "scripted"

    def __init__(self, delay: float = 0.0, fail: bool = False, version: int | None = 3, cached: int = 2):
        self.delay, self.fail, self.version, self.cached = delay, fail, version, cached
        self.calls: list[list[list[int]]] = []
        self.received: list[list[int]] = []  # the prefix objects themselves

    async def score(self, prefixes) -> CriticAnswer:
        self.calls.append([list(p) for p in prefixes])
        self.received += prefixes
        await asyncio.sleep(self.delay)
        if self.fail:
            raise CriticError("critic down")
        return CriticAnswer(
            [len(p) / 100 for p in prefixes], [max(1, len(p) - self.cached) for p in prefixes], self.version
        )

    async def values(self, prefixes):
        return (await self.score(prefixes)).values

    async def check(self) -> None:
        pass


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_concurrent_queries_become_one_call_with_the_same_values_as_single_ones():
    critic = ScriptedCritic()
    prefixes = [[1] * k for k in range(1, 21)]

    async def main():
        batcher = CriticBatcher(critic, timeout_s=1.0, window_s=0.01, max_batch=64)
        together = await asyncio.gather(*(batcher.value(p) for p in prefixes))
        alone = [await batcher.value(p) for p in prefixes]
        return together, alone

    together, alone = asyncio.run(main())
    assert [len(c) for c in critic.calls] == [20] + [1] * 20  # one call for the 20 concurrent queries
    assert [a.value for a in together] == [a.value for a in alone] == [len(p) / 100 for p in prefixes]
    assert {a.batch_size for a in together} == {20} and {a.version for a in together} == {3}
    assert [a.computed_tokens for a in together] == [max(1, len(p) - 2) for p in prefixes]
    # each query's prefix reaches the critic as the list the caller made, never copied on the way
    assert all(got is sent for got, sent in zip(critic.received, prefixes + prefixes, strict=True))


def test_batches_are_bounded_and_window_zero_gathers_one_event_loop_turn():
    critic = ScriptedCritic()

    async def main():
        bounded = CriticBatcher(critic, timeout_s=1.0, window_s=0.05, max_batch=8)
        await asyncio.gather(*(bounded.value([i + 1]) for i in range(20)))
        same_turn = CriticBatcher(critic, timeout_s=1.0, window_s=0.0)
        await asyncio.gather(*(same_turn.value([i + 1]) for i in range(5)))

    before = sample("espo_critic_batch_size_sum")
    asyncio.run(main())
    assert [len(c) for c in critic.calls] == [8, 8, 4, 5]
    assert sample("espo_critic_batch_size_sum") - before == 25


def test_a_window_in_steps_sends_once_the_opener_has_read_that_many_tokens():
    critic = ScriptedCritic()
    a, b = object(), object()

    async def main():
        batcher = CriticBatcher(critic, timeout_s=1.0, window_s=0.0, window_steps=3)
        first = asyncio.ensure_future(batcher.value([1], a))  # opens the batch: a's steps time it
        second = asyncio.ensure_future(batcher.value([2, 2], b))
        await asyncio.sleep(0)
        for _ in range(5):
            batcher.stepped(b)  # another sample's steps do not count
        batcher.stepped(a, 2)
        await asyncio.sleep(0.01)
        held = len(critic.calls)
        batcher.stepped(a)  # the third: sent
        values = await asyncio.gather(first, second)
        # a batch opened by a sample that stops reading goes at once
        third = asyncio.ensure_future(batcher.value([3, 3, 3], b))
        await asyncio.sleep(0.01)
        held_too = len(critic.calls)
        batcher.left(b)
        await third
        # a query asked by no reading sample falls back to the window in time (here: one loop turn)
        await batcher.value([4] * 4)
        return held, values, held_too

    held, values, held_too = asyncio.run(main())
    assert held == 0 and [v.batch_size for v in values] == [2, 2]
    assert [v.value for v in values] == [0.01, 0.02]
    assert held_too == 1
    assert [len(c) for c in critic.calls] == [2, 1, 1]


def test_a_window_in_steps_never_holds_a_query_whose_sample_ended():
    """Samples that end (length) or stop while their query waits for steps: every batch still goes,
    every call returns, and the queries of samples in step share calls."""

    async def run(steps: int):
        critic = ScriptedCritic()
        svc = service(critic, critic_batch_window_steps=steps)
        req = request(8).model_copy(update={"max_tokens": 13})
        out = await asyncio.wait_for(svc.rollouts(req), 30)  # a held batch would hang here
        return critic, out

    critic, out = asyncio.run(run(3))
    assert len(out.trajectories) == 8
    assert out.usage.critic_calls == sum(len(c) for c in critic.calls) > 0
    assert all(t.critic_error is False for t in out.trajectories)
    plain, _ = asyncio.run(run(0))
    assert len(critic.calls) <= len(plain.calls)


class CountingCritic(ScriptedCritic):
    """Records how many calls ran at once at most; with `gated`, each call waits for `gate`."""

    running = most = started = 0

    def __init__(self, gated: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event() if gated else None

    async def score(self, prefixes) -> CriticAnswer:
        self.running += 1
        self.started += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return await super().score(prefixes)
        finally:
            self.running -= 1


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_with_one_batch_in_flight_an_idle_critic_is_asked_at_once_and_a_busy_one_in_larger_batches():
    async def main():
        critic = CountingCritic(gated=True)
        batcher = CriticBatcher(critic, timeout_s=5.0, window_s=0.0, max_in_flight=1)
        first = asyncio.ensure_future(batcher.value([1]))
        await turns()
        sent_at_once = critic.started  # the critic was idle
        later = [asyncio.ensure_future(batcher.value([2] * k)) for k in range(1, 6)]
        await turns()
        held = critic.started  # the first call has not answered: the five wait
        critic.gate.set()
        values = await asyncio.gather(first, *later)
        alone = await batcher.value([7])  # idle again: at once, alone
        return critic, sent_at_once, held, values, alone

    critic, sent_at_once, held, values, alone = asyncio.run(main())
    assert sent_at_once == 1 and held == 1
    assert [len(c) for c in critic.calls] == [1, 5, 1]
    assert [v.value for v in values] == [0.01, 0.01, 0.02, 0.03, 0.04, 0.05]
    assert [v.batch_size for v in values] == [1] + [5] * 5 and alone.batch_size == 1
    assert critic.most == 1


def test_batches_in_flight_through_the_service_never_exceed_the_limit_and_every_call_returns():
    async def run(limit: int):
        critic = CountingCritic(delay=0.01)
        svc = service(critic, critic_batches_in_flight=limit, critic_batch_window_steps=0)
        out = await asyncio.wait_for(svc.rollouts(request(8)), 30)  # a held batch would hang here
        return critic, out

    critic, out = asyncio.run(run(1))
    assert len(out.trajectories) == 8 and critic.most == 1
    assert out.usage.critic_calls == sum(len(c) for c in critic.calls) > 0
    assert all(t.critic_error is False for t in out.trajectories)
    with pytest.raises(ValueError, match="max_in_flight"):
        CriticBatcher(critic, timeout_s=1.0, max_in_flight=-1)


def test_a_cancelled_query_leaves_its_batch_alone():
    critic = ScriptedCritic(delay=0.02)

    async def main():
        batcher = CriticBatcher(critic, timeout_s=1.0, window_s=0.005)
        keep = asyncio.ensure_future(batcher.value([1, 2, 3]))
        drop = asyncio.ensure_future(batcher.value([4, 5]))
        await asyncio.sleep(0.01)  # both sent
        drop.cancel()
        return await keep

    assert asyncio.run(main()).value == 0.03


def test_a_timed_out_batch_fails_every_query_it_held_once():
    critic = ScriptedCritic(delay=1.0)
    before = sample("espo_critic_calls_total", outcome="timeout")

    async def main():
        batcher = CriticBatcher(critic, timeout_s=0.05, window_s=0.005)
        return await asyncio.gather(*(batcher.value([i + 1]) for i in range(6)), return_exceptions=True)

    out = asyncio.run(main())
    assert len(critic.calls) == 1 and all(isinstance(e, CriticError) for e in out)
    assert "a batch of 6 queries" in str(out[0])
    assert sample("espo_critic_calls_total", outcome="timeout") - before == 6


def service(critic, **cfg) -> RolloutService:
    return RolloutService(FakeEngine(length=40, delay=0.002), critic, ServerConfig(model="fake", **cfg))


def request(n: int) -> RolloutRequest:
    return RolloutRequest(
        prompts=[Prompt(token_ids=[5, 6, 7])],
        n=n,
        max_tokens=40,
        seed=1,
        stop_rule="espo",
        state=HOT,
        rule_params={"min_tokens": 4, "critic_stride": 4},
        include=["values"],
    )


def test_a_timed_out_batch_flags_each_trajectory_it_held():
    # 8 samples in lock step ask at the same step: one batch of 8, and it times out
    critic = ScriptedCritic(delay=5.0)
    svc = service(critic, critic_timeout_s=0.05, critic_batch_window_ms=20)
    out = asyncio.run(svc.rollouts(request(8)))
    assert len(critic.calls[0]) == 8, [len(c) for c in critic.calls]
    assert all(t.critic_error for t in out.trajectories)
    assert all(t.end_reason == "length" for t in out.trajectories)  # no_stop: a failed query never stops
    assert out.usage.critic_errors >= 8 and out.usage.critic_tokens == 0
    assert all(t.critic_version is None for t in out.trajectories)


def test_usage_and_trajectories_carry_critic_tokens_and_version():
    critic = ScriptedCritic(version=5, cached=3)
    svc = service(critic, critic_batch_window_ms=20)
    out = asyncio.run(svc.rollouts(request(4)))
    asked = [p for call in critic.calls for p in call]
    assert out.usage.critic_calls == len(asked) >= 4
    assert out.usage.critic_prefix_tokens == sum(len(p) for p in asked)
    assert out.usage.critic_tokens == sum(len(p) - 3 for p in asked)
    assert max(len(c) for c in critic.calls) > 1  # the lock-step samples were batched
    assert {t.critic_version for t in out.trajectories} == {5}
    svc.engine.model = "fake"
    assert svc.info().critic_version == 5


def test_stream_interval_keeps_the_rule_per_token_and_counts_the_overrun():
    class ChunkedEngine(FakeEngine):
        """Delivers tokens in chunks of `params.stream_interval`, as vLLM does."""

        async def generate(self, request_id, prompt, params):
            from espo_server.engine import TokenChunk

            n, k = min(self.length, params.max_tokens), params.stream_interval
            for start in range(0, n, k):
                await asyncio.sleep(self.delay)
                ids = list(range(start, min(n, start + k)))
                last = start + k >= n
                yield TokenChunk(
                    [10 + i % 40 for i in ids],
                    [-9.0] * len(ids),
                    [0.0] * len(ids),
                    finish_reason=self.finish if last else None,
                )

    def run(k: int):
        svc = RolloutService(
            ChunkedEngine(length=40), ScriptedCritic(), ServerConfig(model="fake", stream_interval=k)
        )
        req = RolloutRequest(**(request(1).model_dump() | {"stop_rule": "regret_only", "include": ["z"]}))
        return asyncio.run(svc.rollouts(req)).trajectories[0]

    one, eight = run(1), run(8)
    assert one.stop_step == eight.stop_step == 4  # the same token, decided per token
    assert one.traces.z == eight.traces.z
    assert eight.discarded_tokens == 8 - 5  # the rest of the chunk that held the stop
    assert one.discarded_tokens == 0


def test_a_stock_vllm_critic_refuses_pushes_by_name():
    critic = VllmPoolingCritic("http://127.0.0.1:9")
    with pytest.raises(InvalidRequest, match="espo-server critic"):
        asyncio.run(critic.load_weights("/tmp", None))


def test_a_server_without_critic_refuses_critic_pushes():
    svc = RolloutService(FakeEngine(), None, ServerConfig(model="fake", critic="none"))
    with pytest.raises(InvalidRequest, match="without a critic"):
        asyncio.run(svc.load_critic_weights("/tmp", None))


def test_a_vllm_critic_without_classify_falls_back_to_token_classify():
    """What vLLM 0.32 answers when a token-classification model was served without
    `--pooler-config '{"task": "classify"}'`: the client switches to per-token outputs, once."""
    import json

    import httpx

    tasks = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        tasks.append(body["task"])
        if body["task"] == "classify":
            message = "Try switching the model's pooling_task via --pooler-config.task classify."
            error = {"message": message, "type": "BadRequestError", "param": "task", "code": 400}
            return httpx.Response(400, json={"error": error})
        data = [
            {"index": i, "data": [[0.5]] * (len(p) - 1) + [[len(p) / 10]]}
            for i, p in enumerate(body["input"])
        ]
        return httpx.Response(200, json={"data": data[::-1]})

    client = httpx.AsyncClient(base_url="http://critic", transport=httpx.MockTransport(handler))
    critic = VllmPoolingCritic("http://critic", client=client)

    async def main():
        first = await critic.score([[1, 2, 3], [4, 5]])
        second = await critic.score([[1]])
        return first, second

    first, second = asyncio.run(main())
    assert first.values == [0.3, 0.2] and second.values == [0.1]
    assert first.computed_tokens == [3, 2] and first.version is None
    assert tasks == ["classify", "token_classify", "token_classify"]
