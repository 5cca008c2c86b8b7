"""Group-aware early return, carried-over samples (runs), version spans and the batch statistics of a
run, on the scripted engine of tests/fakes.py (pure control flow; tests/test_runs_vllm.py runs the
same on real vLLM)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from safetensors.numpy import save_file

from espo_client.protocol import (
    GroupEvent,
    Prompt,
    RolloutRequest,
    RunRequest,
    Sampling,
    TrajectoryEvent,
)
from espo_server.errors import Conflict, InvalidRequest
from espo_server.events import CallDone
from tests.fakes import HOT, FakeCritic, FakeEngine, run, service
from tests.waiting import until

SHORT, LONG = 6, 300
# prompt 0 and 1 finish fast, 2 and 3 take LONG tokens (request ids are "<request_id>-<prompt>-<sample>")


def engine(**kw) -> FakeEngine:
    lengths = {f"{rid}-{p}-": LONG for rid in ("c1", "c2", "c3", "s1") for p in (2, 3)}
    return FakeEngine(length=SHORT, delay=0.002, lengths=lengths, **kw)


def req(request_id: str, prompts: int = 4, **kw) -> RolloutRequest:
    body = dict(
        prompts=[Prompt(token_ids=[5, 6, 7 + p]) for p in range(prompts)],
        n=2,
        max_tokens=LONG,
        stop_rule="none",
        state=HOT,
        request_id=request_id,
    )
    body.update(kw)
    return RolloutRequest(**body)


def test_early_return_aborts_the_incomplete_groups():
    eng = engine()
    svc = service(eng, FakeCritic())
    out = run(svc.rollouts(req("c1", return_groups=2)))
    done = [t for t in out.trajectories if t.end_reason == "length"]
    aborted = [t for t in out.trajectories if t.end_reason == "abort"]
    assert sorted({t.prompt_index for t in done}) == [0, 1] and len(done) == 4
    assert sorted({t.prompt_index for t in aborted}) == [2, 3] and len(aborted) == 4
    assert all(len(t.token_ids) < LONG for t in aborted)  # cut short, not waited for
    assert out.usage.groups_returned == 2 and out.usage.aborted == 4 and out.usage.groups_carried == 0
    assert sorted(rid for rid in eng.aborted) == ["c1-2-0", "c1-2-1", "c1-3-0", "c1-3-1"]
    # every generated token entered this batch's statistics, the aborted ones included
    assert out.usage.regret_tokens == sum(len(t.token_ids) for t in out.trajectories)


def test_carried_groups_come_back_whole_once_and_every_token_counts_once():
    eng = engine()
    svc = service(eng, FakeCritic())

    async def go():
        run_id = svc.open_run(RunRequest(run_id="r")).run_id
        first = await svc.rollouts(req("c1", return_groups=2, leftover="carry", run_id=run_id))
        assert svc.run(run_id).carried_groups == 2 and svc.run(run_id).running == 4
        second = await svc.rollouts(req("c2", prompts=2, run_id=run_id))  # waits for everything
        return first, second

    first, second = run(go())
    assert first.usage.groups_returned == 2 and first.usage.groups_carried == 2
    assert {t.prompt_index for t in first.trajectories} == {0, 1} and first.usage.aborted == 0
    carried = [t for t in second.trajectories if t.carried is not None]
    assert len(carried) == 4 and {t.carried.request_id for t in carried} == {"c1"}
    assert {t.prompt_index for t in carried} == {2, 3}  # the indices of the call that started them
    assert all(t.end_reason == "length" and len(t.token_ids) == LONG for t in carried)
    assert all(t.carried.prompt_token_ids == [5, 6, 7 + t.prompt_index] for t in carried)
    assert second.usage.carried_in == 4 and second.usage.groups_returned == 4
    # the trajectories are contiguous: the samples were never restarted
    assert all(t.token_ids == [10 + i % 40 for i in range(LONG)] for t in carried)
    # each token's regret entered exactly one batch: the sums over both calls are every token once
    tokens = sum(len(t.token_ids) for r in (first, second) for t in r.trajectories)
    assert first.usage.regret_tokens + second.usage.regret_tokens == tokens
    assert first.usage.regret_sum + second.usage.regret_sum == pytest.approx(9.0 * tokens)
    # the first batch took the carried samples' tokens generated while it ran, no more
    own = sum(len(t.token_ids) for t in first.trajectories)
    assert own < first.usage.regret_tokens < own + 4 * LONG


def test_a_carried_trajectory_records_every_sampling_setting_of_its_call():
    svc = service(engine(), FakeCritic())
    sampling = dict(
        max_tokens=LONG, temperature=0.7, top_p=0.9, seed=11, stop_token_ids=[3], stop=["@"], ignore_eos=True,
        top_k=7, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5,
        min_tokens=3, logit_bias={9: 2.0}, allowed_token_ids=[5, 6, 9], bad_words=["ab"],
    )  # fmt: skip
    assert set(sampling) == set(Sampling.model_fields)  # every setting differs from its default here

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        await svc.rollouts(req("c1", return_groups=2, leftover="carry", run_id="r", **sampling))
        return await svc.rollouts(req("c2", prompts=1, run_id="r"))

    carried = [t for t in run(go()).trajectories if t.carried]
    assert len(carried) == 4
    for t in carried:
        record = t.carried.model_dump()
        # the sample's own seed: seed + prompt_index * n + sample_index (n=2)
        assert record == {
            **sampling,
            "seed": 11 + 2 * t.prompt_index + t.sample_index,
            "request_id": "c1",
            "prompt_token_ids": [5, 6, 7 + t.prompt_index],
            "stop_rule": "none",
            "shadow": False,
        }


def test_batch_statistics_of_a_run_by_hand():
    """A carried sample's regret is split at the call boundary; its stop counts where it ends."""
    eng = engine()
    svc = service(eng, FakeCritic())

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        first = await svc.rollouts(req("c1", return_groups=2, leftover="carry", run_id="r"))
        groups = svc.runs.get("r").groups
        cut = {s.spec.engine_id: s.counted for g in groups for s in g.samples}
        second = await svc.rollouts(req("c2", prompts=1, run_id="r"))
        return first, second, cut

    first, second, cut = run(go())
    own_first = sum(len(t.token_ids) for t in first.trajectories)
    assert first.usage.regret_tokens == own_first + sum(cut.values())
    carried = [t for t in second.trajectories if t.carried]
    own_second = sum(len(t.token_ids) for t in second.trajectories if not t.carried)
    assert second.usage.regret_tokens == own_second + sum(LONG - n for n in cut.values())
    assert len(carried) == len(cut)
    # learner-owned state: state_after of each call is the update with that call's sums
    assert first.state_after.batches == HOT.batches + 1 and second.state_after.batches == HOT.batches + 1


def test_carried_sample_resumes_across_a_weight_push_with_version_spans(tmp_path):
    eng = engine()
    svc = service(eng, FakeCritic(), weights_dir=[tmp_path])
    weights = tmp_path / "w"
    weights.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(weights / "model.safetensors"))  # read before a push

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        await svc.rollouts(req("c1", return_groups=2, leftover="carry", run_id="r"))
        carried = svc.runs.get("r").samples()
        grown = {id(s): len(s.token_ids) + 1 for s in carried}
        # the carried samples generate on between calls (each of LONG tokens is one engine step)
        await until(lambda: all(len(s.token_ids) >= grown[id(s)] for s in carried), "carried tokens")
        pushed = await svc.load_weights(str(weights), 7)  # suspends them mid-sample, then resumes
        second = await svc.rollouts(req("c2", prompts=1, run_id="r"))
        return pushed, second

    pushed, second = run(go())
    assert pushed.policy_version == 7
    for t in (t for t in second.trajectories if t.carried):
        spans = t.policy_version_spans
        assert [s.version for s in spans] == [0, 7] and spans[0].start == 0 and spans[-1].end == LONG
        assert spans[0].end == spans[1].start and 0 < spans[0].end < LONG
        assert t.policy_version == 0  # the oldest
        assert len(t.token_ids) == LONG and t.token_ids == [10 + i % 40 for i in range(LONG)]
        # the resumed engine request was sent the prompt plus the tokens generated before the push
        resumed = eng.prompts[f"c1-{t.prompt_index}-{t.sample_index}-r1"]
        assert resumed == t.carried.prompt_token_ids + t.token_ids[: spans[0].end]
    fresh = [t for t in second.trajectories if not t.carried]
    assert all([s.version for s in t.policy_version_spans] == [7] for t in fresh)


def test_held_groups_pause_between_calls_and_continue_under_the_weights_pushed_meanwhile(tmp_path):
    """leftover=hold: the incomplete groups stop generating when the call returns; a push finds them
    paused (nothing to suspend); the run's next call resumes them under the new weights, so the
    span boundary is exactly where the first call left them."""
    eng = engine()
    svc = service(eng, FakeCritic(), weights_dir=[tmp_path])
    weights = tmp_path / "w"
    weights.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(weights / "model.safetensors"))

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        first = await svc.rollouts(req("c1", return_groups=2, leftover="hold", run_id="r"))
        held = {s.spec.engine_id: len(s.token_ids) for s in svc.runs.get("r").samples()}
        described = svc.run("r")
        await svc.rollouts(req("other", prompts=1, stop_rule="none"))  # engine steps pass: none for them
        after = {s.spec.engine_id: len(s.token_ids) for s in svc.runs.get("r").samples()}
        pushed = await svc.load_weights(str(weights), 7)
        second = await svc.rollouts(req("c2", prompts=1, run_id="r"))
        return first, held, described, after, pushed, second

    first, held, described, after, pushed, second = run(go())
    assert first.usage.groups_carried == 2 and first.usage.aborted == 0
    assert described.carried_trajectories == 4 and described.running == 0  # held, not generating
    assert after == held and all(0 < k < LONG for k in held.values())
    assert pushed.policy_version == 7
    carried = [t for t in second.trajectories if t.carried]
    assert len(carried) == 4 and second.usage.carried_in == 4
    for t in carried:
        cut = held[f"c1-{t.prompt_index}-{t.sample_index}"]
        assert [(s.start, s.end, s.version) for s in t.policy_version_spans] == [(0, cut, 0), (cut, LONG, 7)]
        assert t.token_ids == [10 + i % 40 for i in range(LONG)]  # continued, not restarted
        resumed = eng.prompts[f"c1-{t.prompt_index}-{t.sample_index}-r1"]
        assert resumed == t.carried.prompt_token_ids + t.token_ids[:cut]
    # every token's regret entered exactly one batch
    tokens = sum(len(t.token_ids) for t in first.trajectories + second.trajectories)
    assert first.usage.regret_tokens + second.usage.regret_tokens == tokens


def test_streaming_sends_complete_groups_then_their_group_event():
    svc = service(engine(), FakeCritic())

    async def go():
        svc.open_run(RunRequest(run_id="r"))
        items = [
            item
            async for item in svc.stream(svc.plan(req("s1", return_groups=2, leftover="carry", run_id="r")))
        ]
        await svc.close_run("r")
        return items

    items = run(go())
    assert isinstance(items[-1], CallDone)
    kinds = ["g" if isinstance(i, GroupEvent) else "t" for i in items[:-1]]
    assert kinds == ["t", "t", "g", "t", "t", "g"]  # n=2 trajectories of a group, then its event
    for k in (2, 5):
        event, members = items[k], items[k - 2 : k]
        assert {m.trajectory.prompt_index for m in members} == {event.prompt_index}
        assert event.sample_count == 2
    sent = [i.trajectory for i in items if isinstance(i, TrajectoryEvent)]
    assert all(t.prompt_index in (0, 1) for t in sent)  # nothing of the carried groups was sent


def test_bad_input_is_refused_naming_the_field_and_nothing_changes():
    svc = service(engine(), FakeCritic())

    async def go():
        cases = [
            (req("b1", return_groups=5), "return_groups"),
            (req("b2", leftover="carry", return_groups=1), "run_id"),
            (req("b2", leftover="hold", return_groups=1), "run_id"),
            (req("b3", run_id="nobody"), "run_id"),
            (req("b4", prompts=0), "prompts"),
        ]
        for request, param in cases:
            with pytest.raises(InvalidRequest) as info:
                svc.plan(request)
            assert info.value.param == param, (request, info.value.message)
        svc.open_run(RunRequest(run_id="r"))
        first = asyncio.create_task(svc.rollouts(req("c1", run_id="r")))
        await until(lambda: svc.runs.get("r").busy, "the first call holds the run")
        with pytest.raises(Conflict):  # one call of a run at a time
            svc.plan(req("b5", run_id="r"))
        await first
        await svc.close_run("r")
        with pytest.raises(InvalidRequest, match="closed"):
            svc.plan(req("b6", run_id="r"))
        with pytest.raises(InvalidRequest, match="closed"):
            svc.open_run(RunRequest(run_id="r"))
        return await svc.rollouts(req("ok", prompts=1))  # and the service goes on serving

    assert run(go()).usage.trajectories == 2


def test_closing_or_idling_a_run_aborts_its_samples():
    eng = engine()
    svc = service(eng, FakeCritic(), run_idle_timeout_s=0.2)

    async def go():
        svc.open_run(RunRequest(run_id="a"))
        svc.open_run(RunRequest(run_id="b"))
        await svc.rollouts(req("c1", return_groups=2, leftover="carry", run_id="a"))
        await svc.rollouts(req("c2", return_groups=2, leftover="carry", run_id="b"))
        closed = await svc.close_run("a")
        await until(lambda: not svc.run("b").open, "the reaper closes the idle run")
        return closed, svc.run("b")

    closed, idle = run(go())
    assert not closed.open and closed.aborted == 4
    assert not idle.open and idle.aborted == 4
    assert sum(rid.startswith(("c1-2", "c1-3", "c2-2", "c2-3")) for rid in eng.aborted) == 8
    assert not any(rid.startswith(("c1-2", "c2-2")) for rid in eng.finished)
