"""The rollout loop's logic on scripted engine streams and critics (no vLLM): the lazy critic racing
the token stream, the cut-back, discarded tokens, critic failures, cancellation.

The fakes (tests/fakes.py) test pure control flow only; tests/test_server_integration.py runs the
same loop on a real vLLM engine and a real critic."""

from __future__ import annotations

import ast
import asyncio
import itertools
from pathlib import Path

import pytest

from espo_client.protocol import Prompt, RolloutRequest
from espo_server.config import ServerConfig
from espo_server.gate import ReadWriteGate
from espo_server.service import RolloutService
from tests.fakes import HOT, FakeCritic, FakeEngine, run, service


def request(**kw) -> RolloutRequest:
    base = dict(
        prompts=[Prompt(token_ids=[5, 6, 7])],
        max_tokens=40,
        stop_rule="espo",
        state=HOT,
        rule_params={"min_tokens": 4, "critic_stride": 4},
        include=["regret", "z", "values"],
    )
    base.update(kw)
    return RolloutRequest(**base)


def test_slow_critic_overrun_is_cut_back_and_counted():
    engine, critic = FakeEngine(length=40, delay=0.002), FakeCritic(value=0.0, delay=0.03)
    out = run(service(engine, critic).rollouts(request()))
    t = out.trajectories[0]
    # first query at t = min_tokens = 4; V = 0 -> threshold beta*eps = 0.5 < z_4: stop at 4
    assert t.end_reason == "espo_stop" and t.stop_step == 4
    assert len(t.token_ids) == 5 and t.reward == -1.0
    assert t.discarded_tokens > 0  # generation went on while the critic answered
    assert out.usage.discarded_tokens == t.discarded_tokens
    assert critic.prefixes == [[5, 6, 7, 10, 11, 12, 13]]  # s_4 = prompt + response[:4]
    assert engine.aborted and not engine.finished
    assert t.traces.values[4] == 0.0 and all(v is None for v in t.traces.values[:4])


def test_stream_ending_while_critic_thinks_still_applies_the_decision():
    engine, critic = FakeEngine(length=6, delay=0.0, finish="stop"), FakeCritic(value=0.0, delay=0.05)
    out = run(service(engine, critic).rollouts(request()))
    t = out.trajectories[0]
    assert t.end_reason == "espo_stop" and t.stop_step == 4 and t.discarded_tokens == 1


def test_high_value_keeps_going_and_queries_every_stride():
    # V = 10: threshold beta*V = 25, above the largest possible z (5)
    engine, critic = FakeEngine(length=30, delay=0.003), FakeCritic(value=10.0, delay=0.0)
    out = run(service(engine, critic).rollouts(request()))
    t = out.trajectories[0]
    assert t.end_reason == "length" and t.stop_step is None and len(t.token_ids) == 30
    queried = [i for i, v in enumerate(t.traces.values) if v is not None]
    assert queried[0] == 4 and all(b - a >= 4 for a, b in itertools.pairwise(queried))
    assert out.usage.critic_calls == len(queried) >= 4


def test_shadow_records_and_runs_to_the_end():
    engine, critic = FakeEngine(length=30), FakeCritic(value=0.0)
    out = run(service(engine, critic).rollouts(request(shadow=True)))
    t = out.trajectories[0]
    assert t.end_reason == "length" and len(t.token_ids) == 30
    assert t.shadow_stop_step == 4 and t.stop_step is None
    assert out.usage.tokens_saved_shadow == 30 - 5 and out.usage.shadow_stopped == 1


@pytest.mark.parametrize(("fallback", "stops"), [("no_stop", False), ("regret_only", True)])
def test_critic_failure_is_flagged_and_follows_the_policy(fallback, stops):
    engine, critic = FakeEngine(length=20), FakeCritic(fail=True)
    out = run(service(engine, critic, critic_fallback=fallback).rollouts(request()))
    t = out.trajectories[0]
    assert t.critic_error and out.usage.critic_errors >= 1
    assert (t.end_reason == "espo_stop") is stops


def test_critic_timeout_counts_as_failure():
    engine, critic = FakeEngine(length=20, delay=0.01), FakeCritic(value=0.0, delay=5.0)
    out = run(service(engine, critic, critic_timeout_s=0.05).rollouts(request()))
    assert out.trajectories[0].critic_error and out.trajectories[0].end_reason == "length"


def test_cancelling_a_call_aborts_every_engine_request():
    engine, critic = FakeEngine(length=10_000, delay=0.001), FakeCritic(value=1.0)
    svc = service(engine, critic)

    async def go():
        task = asyncio.create_task(svc.rollouts(request(n=4, max_tokens=400, stop_rule="none")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert len(engine.aborted) == 4 and not engine.finished
    assert svc.ledger.state.batches == 0  # a cancelled call folds nothing into the state


def test_idempotent_request_id_returns_the_first_result():
    engine, critic = FakeEngine(length=5), FakeCritic()
    svc = service(engine, critic)

    async def go():
        a, b = await asyncio.gather(
            svc.rollouts(request(request_id="same", stop_rule="none")),
            svc.rollouts(request(request_id="same", stop_rule="none")),
        )
        c = await svc.rollouts(request(request_id="same", stop_rule="none"))
        return a, b, c

    a, b, c = run(go())
    assert a is b is c
    assert len(engine.finished) == 1  # one engine request, not three


def test_weight_reload_waits_for_running_rollouts():
    gate = ReadWriteGate()
    order: list[str] = []

    async def reader():
        async with gate.shared():
            order.append("read-start")
            await asyncio.sleep(0.05)
            order.append("read-end")

    async def writer():
        await asyncio.sleep(0.01)
        async with gate.exclusive():
            order.append("write")

    async def late_reader():
        await asyncio.sleep(0.02)
        async with gate.shared():
            order.append("late-read")

    async def go():
        await asyncio.gather(reader(), writer(), late_reader())

    run(go())
    assert order == ["read-start", "read-end", "write", "late-read"]


def test_engine_and_rule_modules_do_not_import_http():
    """The engine and stop-rule layers know nothing of HTTP (vLLM's engine/entrypoint split)."""
    root = Path(__file__).resolve().parents[1]
    layers = (
        *("service.py", "plan.py", "call.py", "fold.py", "events.py", "admin.py", "admission.py"),
        *("sample.py", "trajectory.py", "runs.py", "ledger.py", "idempotency.py", "engine.py", "metrics.py"),
        *("critic.py", "critic_batcher.py", "critic_engine.py", "critic_http.py"),
    )
    pure = [root / "espo_server" / name for name in layers]
    pure.append(root / "client" / "espo_client" / "stop_rule.py")
    for path in pure:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in names if m.split(".")[0] in ("fastapi", "starlette", "uvicorn")}, path
    rule_tree = ast.parse((root / "client" / "espo_client" / "stop_rule.py").read_text())
    rule_imports = {n.module for n in ast.walk(rule_tree) if isinstance(n, ast.ImportFrom)}
    rule_imports |= {a.name for n in ast.walk(rule_tree) if isinstance(n, ast.Import) for a in n.names}
    assert rule_imports <= {"__future__", "math", "collections.abc", "dataclasses", "enum", "numpy"}


def test_verifier_rewards_eos_trajectories_whose_prompt_has_an_answer():
    seen = []

    def verifier(prompt: str, response: str, answer: str) -> float:
        seen.append((prompt, response, answer))
        return 1.0 if answer == "right" else 0.0

    svc = RolloutService(
        FakeEngine(length=3, finish="stop"), FakeCritic(), ServerConfig(model="fake"), verifier
    )
    prompts = [Prompt(text="ab", answer="right"), Prompt(text="cd", answer="wrong"), Prompt(text="ef")]
    out = run(svc.rollouts(request(prompts=prompts, stop_rule="none")))
    assert [t.reward for t in out.trajectories] == [1.0, 0.0, None]  # no answer: the learner scores it
    assert seen[0] == ("ab", "\n\x0b\x0c", "right")  # decoded prompt and response text
    svc = RolloutService(
        FakeEngine(length=3, finish="length"), FakeCritic(), ServerConfig(model="fake"), verifier
    )
    out = run(svc.rollouts(request(prompts=prompts[:1], stop_rule="none")))
    assert out.trajectories[0].reward is None  # truncated: no task reward


class CountingEngine(FakeEngine):
    """Counts the chunks pulled from its streams (no sleeps: the engine's clock is the chunks)."""

    def __init__(self, **kw) -> None:
        super().__init__(delay=0.0, **kw)
        self.pulled, self.ended = 0, False
        self.moved: asyncio.Condition | None = None

    async def generate(self, *args, **kwargs):
        self.moved = self.moved or asyncio.Condition()
        async for chunk in super().generate(*args, **kwargs):
            self.pulled += 1
            self.ended = self.ended or chunk.finish_reason is not None
            async with self.moved:
                self.moved.notify_all()
            yield chunk


class ChunksLateCritic(FakeCritic):
    """Answers each query once the call has pulled `after` more chunks (or its stream ended): a
    critic as slow as `after` decode steps, on any machine."""

    def __init__(self, engine: CountingEngine, after: int, value: float) -> None:
        super().__init__(value=value)
        self.engine, self.after = engine, after

    async def values(self, prefixes):
        self.prefixes.extend(list(p) for p in prefixes)
        target, engine = self.engine.pulled + self.after, self.engine
        assert engine.moved is not None
        async with engine.moved:
            await engine.moved.wait_for(lambda: engine.pulled >= target or engine.ended)
        return [self.value for _ in prefixes]


def test_a_pending_query_costs_no_task_per_chunk():
    """While the critic thinks, the stream is still read inline: the tasks a call creates are its
    samples and its queries (and the critic's batches), however many chunks come meanwhile. The
    critic answers 50 chunks after each query (counted, not timed)."""
    engine = CountingEngine(length=200)
    critic = ChunksLateCritic(engine, after=50, value=10.0)
    created = 0

    def counting(loop, coro, **kwargs):
        nonlocal created
        created += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def go():
        asyncio.get_running_loop().set_task_factory(counting)
        return await service(engine, critic, critic_batch_window_ms=0).rollouts(request(max_tokens=200))

    t = run(go()).trajectories[0]
    assert len(t.token_ids) == 200 and t.end_reason != "espo_stop"
    queries = len(critic.prefixes)
    assert 2 <= queries <= 5  # 4 here: one per 50 chunks, about 150 chunks read while one was pending
    assert created <= 3 * queries + 5, (created, queries)


def test_a_calls_wait_for_its_samples_does_not_grow_with_their_number(monkeypatch):
    """Each sample reports its end by a done-callback: no wait is on every pending sample (that
    was quadratic over a call)."""
    sizes: list[int] = []
    wait = asyncio.wait

    async def recording(fs, *args, **kwargs):
        sizes.append(len(fs))
        return await wait(fs, *args, **kwargs)

    monkeypatch.setattr(asyncio, "wait", recording)
    engine = FakeEngine(length=5, delay=0.001)
    out = run(
        service(engine, FakeCritic()).rollouts(
            request(prompts=[Prompt(token_ids=[5, 6, i]) for i in range(10)], n=30, stop_rule="none")
        )
    )
    assert len(out.trajectories) == 300 and sizes
    assert max(sizes) <= 2, max(sizes)
