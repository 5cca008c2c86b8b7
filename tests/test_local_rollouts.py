"""The in-process rollouts of the toy task (espo_server.toy.local_rollouts): the server's protocol and
stop-rule maths on a torch sampler. No vLLM: a random tiny policy and critic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from espo_client.learner import update_learner_state
from espo_client.stop_rule import EspoParams, EspoState, make_tracker
from espo_server.tiny_model import EOS_ID, make_tiny_models
from espo_server.toy.local_rollouts import LocalClient, critic_values_at, sample_continuations
from espo_server.toy.task import encode, generate

HOT = EspoState(mu=0.0, var=1.0, beta=6.0, warm=True, initialised=True, batches=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    policy_dir, critic_dir = make_tiny_models(Path(tmp_path_factory.mktemp("local")), seed=5)
    return (
        LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        LlamaForTokenClassification.from_pretrained(critic_dir, dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def prompts():
    return [{"token_ids": encode(p.prompt), "answer": p.answer} for p in generate(12, "train", seed=1)]


def test_logprobs_are_the_policys_raw_logprobs(models, prompts):
    policy, critic = models
    response = LocalClient(policy, critic).rollouts(prompts[:4], n=2, max_tokens=20, seed=3, stop_rule="none")
    for t in response.trajectories:
        prompt = prompts[t.prompt_index]["token_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(policy(torch.tensor([prompt + t.token_ids])).logits[0].float(), -1)
        want = [logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(t.token_ids)]
        assert np.allclose(t.logprobs, want, atol=1e-4)
        assert t.end_reason == ("eos" if t.token_ids[-1] == EOS_ID else "length")


@pytest.mark.parametrize("rule", ["espo", "regret_only", "value_only", "random"])
@pytest.mark.parametrize("latency", [0, 3])
def test_every_decision_is_the_trackers_on_the_returned_traces(models, prompts, rule, latency):
    """Replaying the returned regret through a fresh tracker, answering its queries with the returned
    values, stops every trajectory where the call did; discarded tokens are the latency's."""
    policy, critic = models
    params = EspoParams(min_tokens=2, critic_stride=3, v_min=0.0, random_rate=0.5)
    client = LocalClient(policy, critic, params, critic_latency=latency)
    response = client.rollouts(
        prompts, n=4, max_tokens=24, seed=11, stop_rule=rule, state=HOT, include=["regret", "z", "values"]
    )
    assert response.usage.stopped > 0, "the hot state should stop something"
    for t in response.trajectories:
        if rule == "random":
            continue  # its stop step is drawn, not computed from the traces
        tracker = make_tracker(rule, HOT, params)
        stop = pending = None
        for step, g in enumerate(t.traces.regret):
            decision = tracker.step(-g, 0.0)
            if decision.stop:
                stop = step
                break
            if decision.query_value:
                pending = step
            if pending is not None and step - pending >= latency:  # the answer arrives
                asked, pending = pending, None
                assert t.traces.values[asked] is not None
                if tracker.resolve(asked, t.traces.values[asked]):
                    stop = asked
                    break
        if stop is None and pending is not None:  # the stream ended while the critic answered
            assert t.traces.values[pending] is not None
            stop = pending if tracker.resolve(pending, t.traces.values[pending]) else None
        assert stop == t.stop_step
        assert math.isclose(t.traces.z[-1], tracker.z[len(t.traces.z) - 1], abs_tol=1e-9)
        if t.end_reason == "espo_stop":
            assert t.reward == params.r_fail and len(t.token_ids) == t.stop_step + 1
            assert t.discarded_tokens <= latency
    usage = response.usage
    assert usage.discarded_tokens == sum(t.discarded_tokens for t in response.trajectories)
    if latency == 0:
        assert usage.discarded_tokens == 0
    if rule in ("espo", "value_only"):
        assert usage.critic_calls > 0 and 0 < usage.critic_tokens <= usage.critic_prefix_tokens
    assert response.state_after == update_learner_state(HOT, response)


def test_shadow_runs_to_the_end_and_same_seed_same_rollouts(models, prompts):
    policy, critic = models
    client = LocalClient(policy, critic, EspoParams(min_tokens=2))
    real = client.rollouts(prompts, n=3, max_tokens=24, seed=5, stop_rule="regret_only", state=HOT)
    shadow = client.rollouts(
        prompts, n=3, max_tokens=24, seed=5, stop_rule="regret_only", state=HOT, shadow=True
    )
    again = client.rollouts(
        prompts, n=3, max_tokens=24, seed=5, stop_rule="regret_only", state=HOT, shadow=True
    )
    assert [t.token_ids for t in shadow.trajectories] == [t.token_ids for t in again.trajectories]
    assert shadow.usage.stopped == 0 and shadow.usage.shadow_stopped == real.usage.stopped > 0
    for r, s in zip(real.trajectories, shadow.trajectories, strict=True):
        assert s.shadow_stop_step == r.stop_step
        if r.stop_step is not None:  # the same sample: a stopped one is its shadow twin's prefix
            assert s.token_ids[: len(r.token_ids)] == r.token_ids


def test_continuations_and_values_of_prefixes(models):
    policy, critic = models
    prefixes = [encode("1+2="), encode("11+2+3=11+2=")]
    gen = torch.Generator().manual_seed(0)
    out = sample_continuations(policy, prefixes, [5, 0], gen)
    assert len(out[0]) <= 5 and out[1] == []
    values = critic_values_at(critic, prefixes)
    with torch.no_grad():
        alone = critic(torch.tensor([prefixes[1]])).logits[0, -1, 0].item()
    assert values[1] == pytest.approx(alone, abs=1e-5)
