"""Early return, runs and carried-over samples on real vLLM (CPU, the tiny models, HTTP on loopback):
aborted leftovers free the engine, group events stream, and a sample held across a weight push has
spans whose logprobs match HF of the weights that sampled each span. Carried samples that a push
suspends while they generate between calls are tested on the scripted engine
(tests/test_oversampling.py), where a sample cannot finish before the push; on vLLM it could."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.live_server import hf_logprobs, metric, post, rollouts

pytestmark = pytest.mark.vllm

PROMPTS = [{"token_ids": [5, 6, 14 + p, 7]} for p in range(12)]


def push(server, path, version: int) -> None:
    r = httpx.post(server.url + "/v1/weights", json={"path": str(path), "version": version}, timeout=300)
    assert r.status_code == 200, r.text


def test_early_return_aborts_leftovers_and_frees_the_engine(rollout_server):
    out = rollouts(rollout_server, prompts=PROMPTS, n=2, max_tokens=400, seed=3, return_groups=2)
    usage = out["usage"]
    assert usage["groups_returned"] == 2 and usage["groups_carried"] == 0
    by_prompt: dict[int, list[dict]] = {}
    for t in out["trajectories"]:
        by_prompt.setdefault(t["prompt_index"], []).append(t)
    complete = [p for p, ts in by_prompt.items() if all(t["end_reason"] != "abort" for t in ts)]
    assert len(by_prompt) == 12 and len(complete) >= 2
    assert usage["aborted"] == sum(t["end_reason"] == "abort" for t in out["trajectories"]) > 0
    assert usage["regret_tokens"] == sum(len(t["token_ids"]) for t in out["trajectories"])
    assert metric(rollout_server, "vllm:num_requests_running") == 0  # the aborted requests are gone
    info = httpx.get(rollout_server.url + "/v1/info", timeout=10).json()
    assert info["max_num_seqs"] == 48 and info["max_num_batched_tokens"] > 0


def test_streamed_groups_and_bad_input(rollout_server):
    body = {"prompts": PROMPTS[:6], "n": 2, "max_tokens": 300, "seed": 5, "return_groups": 3}
    with httpx.stream("POST", rollout_server.url + "/v1/rollouts", json=body, params={"stream": "true"},
                      timeout=300) as r:  # fmt: skip
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.iter_lines() if line]
    events = [x for x in lines if x["type"] == "group"]
    assert len(events) >= 3 and lines[-1]["type"] == "done"
    sent: list[int] = []
    for x in lines:
        if x["type"] == "trajectory" and x["trajectory"]["end_reason"] != "abort":
            sent.append(x["trajectory"]["prompt_index"])
        elif x["type"] == "group":  # a group's event comes right after all its trajectories
            assert sent[-2:] == [x["prompt_index"]] * 2 and x["sample_count"] == 2
    for patch, param in [
        ({"return_groups": 7}, "return_groups"),
        ({"return_groups": 0}, "return_groups"),
        ({"leftover": "carry"}, "run_id"),
        ({"run_id": "never-opened"}, "run_id"),
        ({"leftover": "later"}, "leftover"),
    ]:
        r = post(rollout_server, {**body, **patch})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (patch, r.text)
    r = httpx.delete(rollout_server.url + "/v1/runs/never-opened", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "run_id"
    assert rollouts(rollout_server, prompts=PROMPTS[:1], n=1, max_tokens=8)["usage"]["trajectories"] == 1


def test_held_samples_span_a_weight_push_and_each_span_matches_its_weights(rollout_server, tiny_models):
    """Greedy decoding makes the lengths known: the tiny policy ends prompt [5, 6, 30, 7] with EOS
    after a few tokens and runs the others to max_tokens. Call 1 (streamed) returns that group and
    holds the twelve others (`leftover: hold`: 36 samples paused where the call left them, so none
    can finish before the push); the weights are pushed, and the run's next call resumes and
    collects them: each has a span of each version, each matching HF of its weights."""
    url = rollout_server.url
    prompts = [{"token_ids": [5, 6, 30, 7]}, *PROMPTS]  # 13 x 3 samples: within the 48 engine slots
    # top_k and min_p keep the most likely token: greedy decoding is the same with them; the carried
    # trajectories record them (and logprobs stay raw: the HF parity below)
    greedy = {"n": 3, "max_tokens": 500, "temperature": 0.0, "top_k": 5, "min_p": 0.05}
    run_id = httpx.post(url + "/v1/runs", json={"run_id": "hold-push"}, timeout=10).json()["run_id"]
    body = {"prompts": prompts, "return_groups": 1, "leftover": "hold", "run_id": run_id, **greedy}
    try:
        with httpx.stream("POST", url + "/v1/rollouts", json=body, params={"stream": "true"},
                          timeout=300) as r:  # fmt: skip
            assert r.status_code == 200
            lines = [json.loads(line) for line in r.iter_lines() if line]
        held = httpx.get(f"{url}/v1/runs/{run_id}", timeout=10).json()
        push(rollout_server, tiny_models["policy_b"], 100)
        second = rollouts(rollout_server, prompts=[], run_id=run_id, **greedy)
    finally:
        push(rollout_server, tiny_models["policy"], 101)  # back, for the other tests
    first = lines[-1]["response"]
    assert first["usage"]["groups_returned"] == 1 and first["usage"]["groups_carried"] == 12
    assert {x["trajectory"]["prompt_index"] for x in lines if x["type"] == "trajectory"} == {0}
    assert held["carried_groups"] == 12 and held["carried_trajectories"] == 36 and held["running"] == 0
    closed = httpx.delete(f"{url}/v1/runs/{run_id}", timeout=30).json()
    assert not closed["open"] and closed["aborted"] == 0
    usage = second["usage"]
    assert usage["groups_returned"] == 12 and usage["carried_in"] == 36 and len(second["trajectories"]) == 36
    for k, t in enumerate(second["trajectories"]):
        assert t["carried"]["request_id"] == first["request_id"] and 1 <= t["prompt_index"] <= 12
        assert t["carried"]["prompt_token_ids"] == prompts[t["prompt_index"]]["token_ids"]
        assert (t["carried"]["top_k"], t["carried"]["min_p"], t["carried"]["max_tokens"]) == (5, 0.05, 500)
        old, new = t["policy_version_spans"]  # sampled partly before, partly after the push
        assert old["version"] == first["policy_version"] and new["version"] == 100 and old["start"] == 0
        assert 0 < old["end"] == new["start"] < new["end"] == len(t["token_ids"]) == 500
        if k % 6:
            continue  # HF parity on one sample in six is enough
        prompt, tokens, logprobs = t["carried"]["prompt_token_ids"], t["token_ids"], np.array(t["logprobs"])
        ref_old = hf_logprobs(tiny_models["policy"], prompt, tokens[: old["end"]])
        ref_new = hf_logprobs(tiny_models["policy_b"], prompt, tokens)[new["start"] :]
        assert np.max(np.abs(ref_old - logprobs[: old["end"]])) < 1e-4
        assert np.max(np.abs(ref_new - logprobs[new["start"] :])) < 1e-4
        wrong = hf_logprobs(tiny_models["policy"], prompt, tokens)[new["start"] :]
        assert np.max(np.abs(wrong - logprobs[new["start"] :])) > 1e-3  # the new span really is new
