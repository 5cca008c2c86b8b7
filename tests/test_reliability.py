"""Hostile or unlucky callers on the scripted engine of tests/fakes.py: reused request ids,
retries racing cancellations, batches committed under running calls, too much in flight, deadlines,
a slow verifier, a dead critic. Each must end in a defined answer with nothing stored wrongly."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

from espo_client.protocol import Prompt, RolloutRequest, RolloutResponse, TrajectoryEvent
from espo_client.stop_rule import EspoState
from espo_server.critic import CriticError
from espo_server.errors import Conflict, Forbidden, InvalidRequest, Overloaded
from espo_server.events import CallDone
from espo_server.idempotency import IdempotencyCache, response_size
from tests.fakes import HOT, FakeCritic, FakeEngine, run, service
from tests.waiting import BOUND_S, until

ENDLESS = 10**9
"""A sample of this many tokens (one per engine step, max_tokens=ENDLESS on an engine of that length)
ends only when it is aborted or cancelled."""


def endless_engine(**kw) -> FakeEngine:
    engine = FakeEngine(delay=0.002, **kw)
    engine.max_model_len = 2 * ENDLESS
    return engine


DEADLINE_S = 2.0
"""Deadline of the calls that test deadlines: 200x what their complete groups need (5 steps of 2 ms)."""


def req(**kw) -> RolloutRequest:
    body = dict(prompts=[Prompt(token_ids=[5, 6, 7])], n=2, max_tokens=20, stop_rule="none")
    body.update(kw)
    return RolloutRequest(**body)


def test_a_request_id_reused_with_another_body_is_a_conflict_and_stores_nothing():
    engine = FakeEngine(length=5)
    svc = service(engine, FakeCritic())
    first = run(svc.rollouts(req(request_id="x", n=2, seed=1)))
    for other in (req(request_id="x", n=3, seed=1), req(request_id="x", n=2, seed=2)):
        with pytest.raises(Conflict) as info:
            svc.plan(other)
        assert info.value.param == "request_id" and info.value.status == 409
    again = run(svc.rollouts(req(request_id="x", n=2, seed=1)))
    assert again is first and len(engine.finished) == 2  # replayed, not regenerated
    unnamed = run(svc.rollouts(req(seed=1)))
    assert svc.idempotency.lookup(req(request_id=unnamed.request_id, seed=1)) is None  # not kept


def test_the_cache_is_bounded_by_bytes_count_and_age():
    svc = service(FakeEngine(length=5), FakeCritic())
    responses = [run(svc.rollouts(req(request_id=f"r{i}"))) for i in range(3)]
    size = response_size(responses[0])
    cache = IdempotencyCache(max_entries=10, max_bytes=2 * size, ttl_s=60)

    async def fill():
        for i, response in enumerate(responses):
            cache.begin(req(request_id=f"r{i}"))
            cache.finish(req(request_id=f"r{i}"), response)

    run(fill())
    assert cache.lookup(req(request_id="r0")) is None and cache.lookup(req(request_id="r2")) is not None
    assert cache.bytes <= 2 * size
    cache.ttl_s = 0.0
    assert cache.lookup(req(request_id="r2")) is None and cache.bytes == 0


def test_a_retry_waiting_on_a_cancelled_call_runs_it_instead_of_hanging():
    engine = FakeEngine(length=400, delay=0.002)
    svc = service(engine, FakeCritic())

    async def go():
        first = asyncio.create_task(svc.rollouts(req(request_id="y", max_tokens=400)))
        await asyncio.sleep(0.05)
        retry = asyncio.create_task(svc.rollouts(req(request_id="y", max_tokens=400)))
        await asyncio.sleep(0.05)
        first.cancel()
        return await asyncio.wait_for(retry, 30)

    out = run(go())
    assert out.usage.trajectories == 2 and all(len(t.token_ids) == 400 for t in out.trajectories)
    assert sorted(engine.aborted) == ["y-0-0", "y-0-1"]  # the first call's, cancelled
    assert svc.ledger.state.batches == 1  # only the retry's batch was folded


def test_a_streaming_retry_of_a_running_call_waits_and_replays_it():
    engine = FakeEngine(length=30, delay=0.002)
    svc = service(engine, FakeCritic())

    async def go():
        first = asyncio.create_task(svc.rollouts(req(request_id="z")))
        await asyncio.sleep(0.02)
        items = [item async for item in svc.stream(svc.plan(req(request_id="z")))]
        return await first, items

    first, items = run(go())
    assert items[-1].response is first and len(engine.finished) == 2  # one run, not two


def test_batches_close_only_when_their_calls_have_returned():
    engine = FakeEngine(length=200, delay=0.002)
    svc = service(engine, FakeCritic())

    async def go():
        running = asyncio.create_task(svc.rollouts(req(batch_id="b1", max_tokens=200)))
        await asyncio.sleep(0.05)
        with pytest.raises(Conflict):
            svc.commit("b1")  # a late call would be folded in as a batch of its own
        with pytest.raises(Conflict):
            svc.plan(req(batch_id="b2"))  # would close b1 under its running call
        with pytest.raises(Conflict):
            svc.set_state(EspoState())
        await running
        assert svc.ledger.open.calls == 1 and svc.ledger.open.running == 0
        cancelled = asyncio.create_task(svc.rollouts(req(batch_id="b1", max_tokens=200)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert svc.ledger.open.calls == 1 and svc.ledger.open.running == 0  # as if it never ran
        svc.commit("b1")
        return svc.ledger.state

    state = run(go())
    assert state.batches == 1 and svc.ledger.open is None
    for bad in (req(batch_id="b", update_state=False), req(batch_id="b", state=EspoState())):
        with pytest.raises(InvalidRequest) as info:
            svc.plan(bad)
        assert info.value.param == "batch_id"


def test_too_much_in_flight_is_a_429_with_retry_after():
    svc = service(FakeEngine(length=200, delay=0.002), FakeCritic(), max_inflight_trajectories=5)

    async def go():
        running = asyncio.create_task(svc.rollouts(req(n=4, max_tokens=200)))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded) as info:
            svc.plan(req(n=2))
        assert info.value.status == 429 and info.value.retry_after_s > 0
        svc.plan(req(n=1))  # what still fits
        await running
        assert svc.admission.inflight == 0
        return svc.plan(req(n=5))

    assert run(go()).request.n == 5


def test_a_deadline_returns_what_is_complete_and_aborts_the_rest():
    engine = endless_engine(length=5, lengths={"d-1-": ENDLESS})
    svc = service(engine, FakeCritic())
    out = run(svc.rollouts(req(request_id="d", prompts=[Prompt(token_ids=[5]), Prompt(token_ids=[6])],
                               max_tokens=ENDLESS, deadline_s=DEADLINE_S)))  # fmt: skip
    assert out.usage.deadline_hit and out.usage.groups_returned == 1 and out.usage.aborted == 2
    assert sorted(engine.aborted) == ["d-1-0", "d-1-1"]  # the endless ones, ended by the deadline
    quick = run(svc.rollouts(req(max_tokens=5, deadline_s=30)))
    assert not quick.usage.deadline_hit


def test_a_streamed_call_cut_by_its_deadline_sends_every_trajectory_once():
    """A group cut short by the deadline: its samples that ended before were streamed one by one,
    the aborted rest follow; none twice (found by bench/soak.py)."""
    engine = endless_engine(length=5, lengths={"s-0-1": ENDLESS, "s-1-": ENDLESS})
    svc = service(engine, FakeCritic())

    async def go():
        plan = svc.plan(req(request_id="s", prompts=[Prompt(token_ids=[5]), Prompt(token_ids=[6])],
                            max_tokens=ENDLESS, deadline_s=DEADLINE_S))  # fmt: skip
        return [event async for event in svc.stream(plan)]

    events = run(go())
    sent = [(e.trajectory.prompt_index, e.trajectory.sample_index) for e in events[:-1]]
    assert isinstance(events[-1], CallDone) and all(isinstance(e, TrajectoryEvent) for e in events[:-1])
    done = events[-1].response
    assert done.usage.deadline_hit
    assert sorted(sent) == [(0, 0), (0, 1), (1, 0), (1, 1)], sent
    assert sorted((t.prompt_index, t.sample_index) for t in done.trajectories) == sorted(sent)
    assert done.usage.aborted == 3


def test_the_verifier_runs_off_the_event_loop():
    """A verifier that blocks (a sandbox, a parser) until the event loop has run a task of its own:
    on the loop's thread it would wait for ever (bounded here: it then answers 0)."""
    in_verifier, loop_ran = threading.Event(), threading.Event()

    def blocking_verifier(prompt, response, answer):
        in_verifier.set()
        return 1.0 if loop_ran.wait(timeout=BOUND_S) else 0.0

    svc = service(FakeEngine(length=3, finish="stop"), FakeCritic(), verifier=blocking_verifier)

    async def go():
        async def other_work():
            await until(in_verifier.is_set, "the verifier is called")
            loop_ran.set()

        other = asyncio.create_task(other_work())
        out = await svc.rollouts(req(prompts=[Prompt(text="ab", answer="x")], n=2))
        await other
        return out

    out = run(go())
    assert [t.reward for t in out.trajectories] == [1.0, 1.0]  # the loop ran while the verifier blocked


def test_readiness_follows_the_engine_not_the_critic():
    svc = service(FakeEngine(), FakeCritic(fail=True))

    async def check_health():
        return None

    svc.engine.check_health = check_health
    ok, detail = run(svc.readiness())
    assert ok and detail["engine"] == "ok" and detail["critic"].startswith("down")
    assert isinstance(run(svc.rollouts(req(stop_rule="espo"))), RolloutResponse)  # and it serves


def test_weight_pushes_load_only_from_the_configured_directories(tmp_path):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    from safetensors.numpy import save_file

    for d in (allowed / "ckpt", elsewhere / "ckpt"):
        d.mkdir(parents=True)
        save_file({"w": np.zeros((2, 3), dtype=np.float32)}, str(d / "model.safetensors"))
    closed = service(FakeEngine(), FakeCritic())
    with pytest.raises(Forbidden, match="--weights-dir"):
        run(closed.load_weights(str(allowed / "ckpt"), 1))
    svc = service(FakeEngine(), FakeCritic(), weights_dir=[allowed])
    for path in (elsewhere / "ckpt", allowed / ".." / "elsewhere" / "ckpt", "/etc"):
        with pytest.raises(Forbidden) as info:
            run(svc.load_weights(str(path), 1))
        assert info.value.status == 403 and info.value.param == "path"
    assert run(svc.load_weights(str(allowed / "ckpt"), 4)).policy_version == 4
    assert svc.engine.policy_version == 4


def test_a_weights_path_that_is_no_file_system_path_is_a_400_naming_path(tmp_path):
    """Found by bench/fuzz.py: a NUL byte in the path was a ValueError, answered 503 with a traceback."""
    svc = service(FakeEngine(), FakeCritic(), weights_dir=[tmp_path])
    odd = ("/tmp/a\x00b", tmp_path / "a\x00b", tmp_path / ("x" * 300), tmp_path / "none")
    for path in map(str, odd):
        with pytest.raises(InvalidRequest) as info:
            run(svc.load_weights(path, 1))
        assert info.value.status == 400 and info.value.param == "path"
    assert svc.engine.policy_version == 0


# --- found while soaking (reliability branch): each failed before its fix ---------------------------


async def _consume(stream) -> list:
    return [item async for item in stream]


def test_a_call_cancelled_while_a_weight_push_holds_the_engine_leaves_its_request_id_usable():
    engine = FakeEngine(length=5)
    svc = service(engine, FakeCritic())

    async def go():
        async with engine.gate.exclusive():  # a weight push is loading: new calls wait for it
            first = asyncio.create_task(svc.rollouts(req(request_id="g")))
            await asyncio.sleep(0.02)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        return await asyncio.wait_for(svc.rollouts(req(request_id="g")), 10)  # used to wait forever

    out = run(go())
    assert out.usage.trajectories == 2 and svc.ledger.state.batches == 1


def test_calls_that_race_for_a_run_or_a_batch_leave_both_usable():
    from espo_client.protocol import RunRequest

    svc = service(FakeEngine(length=200, delay=0.002), FakeCritic())

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        a = svc.plan(req(request_id="a", run_id="r", max_tokens=200))
        b = svc.plan(req(request_id="b", run_id="r"))  # planned while the run was free
        first = asyncio.create_task(_consume(svc.stream(a)))
        await asyncio.sleep(0)  # a has claimed the run
        with pytest.raises(Conflict):
            await _consume(svc.stream(b))
        await first
        assert svc.idempotency.lookup(req(request_id="b", run_id="r")) is None  # not left "running"
        await asyncio.wait_for(svc.rollouts(req(request_id="b", run_id="r")), 10)
        # a call of batch b2 planned while batch b1 was idle, started once b1 has a call running
        c = svc.plan(req(request_id="c", run_id="r", batch_id="b2"))
        b1 = asyncio.create_task(svc.rollouts(req(batch_id="b1", max_tokens=200)))
        await asyncio.sleep(0.02)
        with pytest.raises(Conflict):
            await _consume(svc.stream(c))
        await b1
        assert not svc.runs.get("r").busy  # the run is free again (it used to stay busy for good)
        return await asyncio.wait_for(svc.rollouts(req(request_id="c", run_id="r", batch_id="b2")), 10)

    assert run(go()).usage.trajectories == 2


def test_twin_streamed_calls_with_one_request_id_run_once():
    engine = FakeEngine(length=30, delay=0.002)
    svc = service(engine, FakeCritic())

    async def go():
        # A streamed call is planned by its route and starts when the response body is iterated:
        # both twins are planned before either starts.
        a, b = svc.plan(req(request_id="t")), svc.plan(req(request_id="t"))
        return await asyncio.gather(_consume(svc.stream(a)), _consume(svc.stream(b)))

    first, second = run(go())
    assert len(engine.finished) == 2  # one run of n=2, not two
    first, second = first[-1].response, second[-1].response
    assert first is second
    assert [t.token_ids for t in first.trajectories] == [t.token_ids for t in second.trajectories]


def test_a_stream_closed_right_after_its_answer_keeps_what_the_run_carries():
    from espo_client.protocol import RunRequest
    from espo_server import metrics

    engine = FakeEngine(length=5, delay=0.002, lengths={"k-1-": 10_000})
    svc = service(engine, FakeCritic())
    cancelled = metrics.REQUESTS.labels(outcome="cancelled")
    before = cancelled._value.get()

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        body = req(request_id="k", run_id="r", prompts=[Prompt(token_ids=[5]), Prompt(token_ids=[6])],
                   max_tokens=300, return_groups=1, leftover="carry")  # fmt: skip
        stream = svc.stream(svc.plan(body))
        async for item in stream:
            if isinstance(item, CallDone):
                break
        await stream.aclose()  # the client went away while the done line was being sent
        assert item.response.usage.groups_carried == 1
        assert len(svc.runs.get("r").groups) == 1  # what the answer said the run carries
        return await asyncio.wait_for(svc.rollouts(req(request_id="k2", run_id="r", prompts=[])), 30)

    out = run(go())
    assert [(t.carried.request_id, t.prompt_index, t.end_reason) for t in out.trajectories] == [
        ("k", 1, "length"),
        ("k", 1, "length"),
    ]
    assert cancelled._value.get() == before  # an answered call is not also counted as cancelled


def test_a_call_that_could_never_fit_the_inflight_cap_is_a_400_not_a_429_forever():
    svc = service(FakeEngine(length=5), FakeCritic(), max_inflight_trajectories=4)
    with pytest.raises(InvalidRequest) as info:
        svc.plan(req(n=5))  # idle server: a 429 here would have the client retry for ever
    assert info.value.status == 400 and info.value.param == "n"
    assert run(svc.rollouts(req(n=4))).usage.trajectories == 4


def test_critic_queries_cut_short_by_an_abort_are_counted_in_metrics_too():
    from espo_server import metrics

    def counted() -> float:
        outcomes = ("ok", "error", "timeout", "cancelled")
        return sum(metrics.CRITIC_CALLS.labels(outcome=o)._value.get() for o in outcomes)

    engine = endless_engine(length=ENDLESS)
    svc = service(engine, FakeCritic(value=0.0, delay=BOUND_S), critic_timeout_s=BOUND_S)
    before = counted()
    out = run(svc.rollouts(req(stop_rule="espo", state=HOT, max_tokens=ENDLESS, deadline_s=DEADLINE_S,
                               rule_params={"min_tokens": 4, "critic_stride": 4})))  # fmt: skip
    assert out.usage.aborted == 2 and out.usage.critic_calls == 2  # one query each, pending at the abort
    assert counted() - before == out.usage.critic_calls  # espo_critic_calls_total agrees with usage


def test_undecodable_bodies_unknown_paths_and_methods_get_the_error_envelope():
    """Found by bench/fuzz.py: FastAPI's body parser and router raise Starlette's HTTPException,
    which the handler of FastAPI's subclass did not catch ({"detail": ...} bodies)."""
    import httpx

    from espo_server.app import build_app

    svc = service(FakeEngine(length=5), FakeCritic())
    app = build_app(svc.config)
    app.state.service = svc

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://espo") as http:
            headers = {"content-type": "application/json"}
            return [
                await http.put("/v1/espo/state", content=b",G5T\xff\xfe\r\xd7\x8c", headers=headers),
                await http.post("/v1/rollouts", content=b"\xff\xfe", headers=headers),
                await http.get("/v1/nothing-here"),
                await http.delete("/v1/info"),
            ]

    answers = run(go())
    assert [a.status_code for a in answers] == [400, 400, 404, 405]
    assert answers[3].headers["allow"] == "GET"
    for answer in answers:
        error = answer.json()["error"]
        assert error["code"] == answer.status_code and error["message"]


def test_a_cancelled_call_of_a_run_gives_back_every_group_it_took_over():
    """A carried group that completed during a call that was then cancelled (a client timeout)
    reached nobody: the run keeps it for the retry, which gets it once."""
    from espo_client.protocol import RunRequest

    engine = endless_engine(length=5, lengths={"a-1-": 60, "b-0-": ENDLESS})
    svc = service(engine, FakeCritic())

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        prompts = [Prompt(token_ids=[5]), Prompt(token_ids=[6])]
        body = req(request_id="a", run_id="r", prompts=prompts, max_tokens=99, return_groups=1)
        body = body.model_copy(update={"leftover": "carry"})
        first = await svc.rollouts(body)
        assert first.usage.groups_carried == 1
        carried = svc.runs.get("r").groups[0]
        second = asyncio.create_task(svc.rollouts(req(request_id="b", run_id="r", max_tokens=ENDLESS)))
        await until(lambda: carried.done, "the carried group (60 tokens) completes; b's own never does")
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        return await asyncio.wait_for(svc.rollouts(req(request_id="c", run_id="r", prompts=[])), 30)

    out = run(go())
    assert [(t.carried.request_id, t.prompt_index, len(t.token_ids)) for t in out.trajectories] == [
        ("a", 1, 60),
        ("a", 1, 60),
    ]


def test_the_critic_server_is_behind_the_api_key_and_loads_only_from_weights_dir(tmp_path):
    """`espo-server critic --api-key K --weights-dir D`: every /v1 route needs the bearer token
    (/health does not), a push outside D is a 403 naming `path`; the rollout server's remote critic
    client sends its key."""
    from types import SimpleNamespace

    from espo_server.critic import CriticAnswer
    from espo_server.critic_http import EspoValuesCritic
    from espo_server.critic_server import build_critic_app

    class Critic:
        model, version, weights_dir, prefix_caching, block_size = "c", 0, "/c", True, 16
        llm = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 32))

        def __init__(self) -> None:
            self.pushed: list[str] = []

        async def score(self, prefixes):
            return CriticAnswer([0.5] * len(prefixes), [len(p) for p in prefixes], self.version)

        async def check(self):
            pass

        async def load_weights(self, path, version):
            self.pushed.append(path)
            self.version = version or self.version + 1
            return self.version, 0.0

    allowed = tmp_path / "weights"
    (allowed / "v1").mkdir(parents=True)
    critic = Critic()
    app = build_critic_app(critic, api_key="sesame", weights_dir=[allowed])

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://critic") as http:
            assert (await http.get("/health")).status_code == 200
            for method, path, body in [
                ("POST", "/v1/values", {"token_ids": [[1, 2]]}),
                ("POST", "/v1/critic/weights", {"path": str(allowed / "v1")}),
                ("GET", "/v1/info", None),
            ]:
                r = await http.request(method, path, json=body)
                assert r.status_code == 401, (path, r.text)
                r = await http.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
                assert r.status_code == 401, (path, r.text)
            key = {"Authorization": "Bearer sesame"}
            r = await http.post("/v1/critic/weights", json={"path": "/etc"}, headers=key)
            assert r.status_code == 403 and r.json()["error"]["param"] == "path", r.text
            assert critic.pushed == []  # refused before the critic saw it
            r = await http.post("/v1/critic/weights", json={"path": str(allowed / "v1")}, headers=key)
            assert r.status_code == 200 and critic.pushed == [str(allowed / "v1")], r.text

            # the rollout server's client for it, with the key, through the same app
            remote = EspoValuesCritic("http://critic", api_key="sesame", timeout_s=5)
            assert remote._client.headers["authorization"] == "Bearer sesame"
            await remote.aclose()
            remote = EspoValuesCritic(
                "http://critic", client=httpx.AsyncClient(transport=transport, base_url="http://critic")
            )
            with pytest.raises(CriticError, match="bearer token"):
                await remote.score([[1, 2]])
            await remote.aclose()

    asyncio.run(go())


def test_the_rollout_app_is_behind_the_api_key():
    """Every /v1 route needs `Authorization: Bearer KEY` (checked before the service is reached);
    /healthz does not."""
    from espo_server.app import build_app
    from espo_server.config import ServerConfig

    app = build_app(ServerConfig(model="fake", api_key="sesame"))
    app.state.service = service(FakeEngine(length=3), FakeCritic())

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://espo") as http:
            assert (await http.get("/healthz")).status_code == 200
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sesame"}):
                r = await http.get("/v1/espo/state", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
            r = await http.get("/v1/espo/state", headers={"Authorization": "Bearer sesame"})
            assert r.status_code == 200, r.text

    asyncio.run(go())
