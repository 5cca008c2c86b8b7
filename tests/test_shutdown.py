"""How the service ends, on the scripted engine of tests/fakes.py: the drain after SIGTERM (running
calls answered, new work refused with a 503 and Retry-After, calls past the grace ended with nothing
kept) and a dead engine (every /v1 call a 503 engine_dead). bench/faults.py does the same to a real
server process (SIGTERM, kill -9 of vLLM's engine process); tests/test_soak.py runs the kill -9."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from espo_client.protocol import Prompt, RolloutRequest, RolloutResponse, RunRequest
from espo_server.app import build_app
from espo_server.errors import EngineDead, ShuttingDown
from tests.fakes import FakeCritic, FakeEngine, GatedEngine, run, service
from tests.waiting import BOUND_S, until


def req(**kw) -> RolloutRequest:
    body = dict(prompts=[Prompt(token_ids=[5, 6, 7])], n=2, max_tokens=20, stop_rule="none")
    body.update(kw)
    return RolloutRequest(**body)


def test_a_drain_answers_the_running_calls_and_refuses_new_work():
    engine = FakeEngine(length=100, delay=0.002)
    svc = service(engine, FakeCritic())

    async def go():
        finished = await svc.rollouts(req(request_id="done"))
        running = asyncio.create_task(svc.rollouts(req(request_id="running", max_tokens=100)))
        await until(lambda: svc.admission.running == 1, "the call runs")
        drain = asyncio.create_task(svc.drain(grace_s=60))
        await until(lambda: svc.admission.draining, "the drain begins")
        with pytest.raises(ShuttingDown) as info:
            svc.plan(req(request_id="new"))
        assert info.value.status == 503 and info.value.retry_after_s > 0
        with pytest.raises(ShuttingDown):
            await svc.load_weights("/anywhere", 1)
        with pytest.raises(ShuttingDown):
            svc.open_run(RunRequest())
        ready, detail = await svc.readiness()
        assert not ready and "shutting down" in detail["server"]
        assert svc.plan(req(request_id="done")).known is finished  # a finished answer is still given
        cut = await asyncio.wait_for(drain, 60)
        return cut, await running

    cut, answered = run(go())
    assert cut == 0 and isinstance(answered, RolloutResponse)
    assert all(len(t.token_ids) == 100 for t in answered.trajectories)
    assert svc.admission.running == 0 and svc.ledger.state.batches == 2


def test_calls_past_the_grace_are_ended_with_a_503_and_nothing_kept():
    engine = FakeEngine(length=10**9, delay=0.002)  # ends only when aborted
    svc = service(engine, FakeCritic())

    async def go():
        plain = asyncio.create_task(svc.rollouts(req(request_id="slow", max_tokens=400)))
        streamed = svc.stream(svc.plan(req(request_id="slow-stream", max_tokens=400)))
        items: list = []

        async def consume():
            async for item in streamed:
                items.append(item)

        stream_task = asyncio.create_task(consume())
        await until(lambda: svc.admission.running == 2 and len(engine.prompts) == 4, "both calls generate")
        cut = await asyncio.wait_for(svc.drain(grace_s=0.2), 60)
        results = await asyncio.gather(plain, stream_task, return_exceptions=True)
        return cut, results, items

    cut, results, items = run(go())
    assert cut == 2
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert items == []  # nothing of the streamed call had ended
    assert svc.ledger.state.batches == 0  # nothing folded
    assert sorted(engine.aborted) == ["slow-0-0", "slow-0-1", "slow-stream-0-0", "slow-stream-0-1"]
    assert svc.idempotency.lookup(req(request_id="slow", max_tokens=400)) is None  # a retry runs it


def test_a_dead_engine_answers_every_v1_call_with_a_503_engine_dead():
    engine = FakeEngine(length=5)
    svc = service(engine, FakeCritic())
    app = build_app(svc.config)
    app.state.service = svc

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://espo") as http:
            body = req().model_dump(mode="json", exclude_none=True)
            assert (await http.post("/v1/rollouts", json=body)).status_code == 200
            engine.dead = True
            answers = [
                await http.post("/v1/rollouts", json=body),
                await http.get("/v1/espo/state"),
                await http.get("/v1/info"),
                await http.post("/v1/weights", json={"path": "/x"}),
            ]
            health = await http.get("/healthz")
            return answers, health

    answers, health = run(go())
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["type"] == "engine_dead" and "engine process has died" in error["message"]
    assert health.status_code == 200  # alive (the process), not ready
    with pytest.raises(EngineDead):
        svc.plan(req())


def test_calls_whose_streams_hang_when_the_engine_dies_are_ended_with_engine_dead():
    """vLLM leaves the requests its killed engine process had not read yet hanging: no output, no
    error. fail_calls (serve.py's watchdog, once it sees the death) ends the calls, a run's call
    too, and the samples reading those streams; a call begun after it ends the same way."""
    engine = GatedEngine(length=5)  # never released: its streams hang like those requests
    svc = service(engine, FakeCritic())

    async def go():
        run_id = svc.open_run(RunRequest()).run_id
        calls = [
            asyncio.create_task(svc.rollouts(req(request_id="plain"))),
            asyncio.create_task(svc.rollouts(req(request_id="in-run", run_id=run_id))),
        ]
        await until(lambda: svc.admission.running == 2 and svc.admission.inflight == 4, "both calls run")
        engine.dead = True
        svc.fail_calls()
        answers = await asyncio.gather(*calls, return_exceptions=True)
        await until(lambda: svc.admission.inflight == 0, "the hanging samples end")
        engine.dead = False  # as if the death were not seen yet when the next call is planned
        late = await asyncio.gather(svc.rollouts(req(request_id="late")), return_exceptions=True)
        return answers, late[0]

    answers, late = run(go())
    assert all(isinstance(a, EngineDead) for a in answers), answers
    assert isinstance(late, EngineDead)  # a call begun after the death: no stream was read
    assert svc.admission.running == 0 and svc.admission.inflight == 0  # every hanging sample ended
    assert svc.ledger.state.batches == 0


class HalfHanging(FakeEngine):
    """The samples of prompts ending in 8 hang, as requests a dead vLLM engine never read do."""

    async def generate(self, request_id, prompt_token_ids, params):
        if prompt_token_ids[-1] == 8:
            with self.readers.reading():
                await asyncio.Event().wait()
        async for chunk in super().generate(request_id, prompt_token_ids, params):
            yield chunk


def test_samples_a_call_waits_for_outside_its_endings_are_ended_by_the_engines_death():
    """A call whose first group is complete aborts the others and waits for their samples, which
    hang on the dead engine: only failing the engine's streams ends them (503 engine_dead)."""
    engine = HalfHanging(length=5)
    svc = service(engine, FakeCritic())
    prompts = [Prompt(token_ids=[5, 6, 7]), Prompt(token_ids=[5, 6, 8])]

    async def go():
        call = asyncio.create_task(svc.rollouts(req(prompts=prompts, return_groups=1)))
        await until(lambda: len(engine.finished) == 2 and svc.admission.inflight == 2, "group 0 done")
        engine.dead = True
        svc.fail_calls()
        answer = (await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), BOUND_S))[0]
        return answer

    answer = run(go())
    assert isinstance(answer, EngineDead), answer
    assert svc.admission.running == 0 and svc.admission.inflight == 0


def test_a_503_shutting_down_carries_retry_after_over_http():
    svc = service(FakeEngine(length=5), FakeCritic())
    app = build_app(svc.config)
    app.state.service = svc
    svc.admission.draining = True

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://espo") as http:
            body = req().model_dump(mode="json", exclude_none=True)
            return await http.post("/v1/rollouts", json=body), await http.get("/readyz")

    answer, ready = run(go())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["type"] == "shutting_down"
    assert ready.status_code == 503
