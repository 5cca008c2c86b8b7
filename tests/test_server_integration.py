"""The rollout server end to end: real vLLM on CPU, the tiny models, HTTP on loopback."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict

import httpx
import numpy as np
import pytest

from espo_client.learner import update_learner_state
from espo_client.protocol import RolloutResponse
from espo_client.stop_rule import EspoParams, EspoState, smoothed_regret, threshold
from tests.live_server import EAGER, PROMPT, hf_logprobs, metric, post, rollouts
from tests.waiting import wait_until

pytestmark = pytest.mark.vllm


def assert_parity(server, model_dir, seed: int) -> list[list[float]]:
    out = rollouts(server, prompts=[{"token_ids": PROMPT}], n=3, max_tokens=40, seed=seed, ignore_eos=True)
    got = []
    for t in out["trajectories"]:
        ref = hf_logprobs(model_dir, PROMPT, t["token_ids"])
        assert len(t["logprobs"]) == len(t["token_ids"]) == 40
        assert np.max(np.abs(ref - np.array(t["logprobs"]))) < 1e-4
        got.append(t["logprobs"])
    return got


def test_logprobs_match_hf_before_and_after_weight_push(rollout_server, tiny_models):
    before = assert_parity(rollout_server, tiny_models["policy"], seed=11)
    r = httpx.post(
        rollout_server.url + "/v1/weights",
        json={"path": str(tiny_models["policy_b"]), "version": 1},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert r.json()["policy_version"] == 1
    after = assert_parity(rollout_server, tiny_models["policy_b"], seed=11)
    assert np.max(np.abs(np.array(before[0][:1]) - np.array(after[0][:1]))) > 1e-3  # really new weights
    info = httpx.get(rollout_server.url + "/v1/info", timeout=10).json()
    assert info["policy_version"] == 1
    # and back, so the other tests see the seed-0 policy
    r = httpx.post(
        rollout_server.url + "/v1/weights",
        json={"path": str(tiny_models["policy"]), "version": 2},
        timeout=300,
    )
    assert r.json()["policy_version"] == 2
    assert_parity(rollout_server, tiny_models["policy"], seed=12)
    out = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], max_tokens=4)
    assert out["trajectories"][0]["policy_version"] == 2


def test_rule_none_never_stops(rollout_server):
    out = rollouts(
        rollout_server,
        prompts=[{"token_ids": PROMPT}],
        n=16,
        max_tokens=64,
        seed=3,
        stop_rule="none",
        state=EAGER,
        include=["z"],
    )
    ends = {t["end_reason"] for t in out["trajectories"]}
    assert ends <= {"eos", "length"}
    assert out["usage"]["stopped"] == 0 and out["usage"]["critic_calls"] == 0
    assert out["state_after"]["beta"] == EAGER["beta"]  # plain calls do not steer beta
    # ... though the same state would have stopped some (z above the lowest threshold beta*eps)
    assert any(max(t["traces"]["z"][8:], default=0) > EAGER["beta"] * 0.2 for t in out["trajectories"])


def check_espo_decisions(out: dict, shadow: bool) -> list[dict]:
    """Recompute z from the returned regrets with the formulas and check every decision."""
    params = EspoParams(**{k: v for k, v in out["rule_params"].items()})
    state = EspoState(**out["state_used"])
    stopped = []
    for t in out["trajectories"]:
        tr = t["traces"]
        z = smoothed_regret(tr["regret"], state, params)
        np.testing.assert_allclose(z, tr["z"], atol=1e-9)
        step = t["shadow_stop_step"] if shadow else t["stop_step"]
        for i, v in enumerate(tr["values"]):
            if v is None:
                continue
            # the critic is only asked when z_t is above the lowest threshold, after min_tokens
            assert i >= params.min_tokens and z[i] > threshold(state.beta, 0.0, params.eps)
            crossed = z[i] > threshold(state.beta, v, params.eps)
            assert crossed == (i == step), (i, step, z[i], v)
        if step is not None:
            assert tr["values"][step] is not None
            stopped.append(t)
    return stopped


def test_espo_stops_and_traces_reproduce_the_decision(rollout_server):
    server_state = httpx.get(rollout_server.url + "/v1/espo/state", timeout=10).json()
    out = rollouts(
        rollout_server,
        prompts=[{"token_ids": PROMPT}, {"token_ids": [9, 9, 8]}],
        n=8,
        max_tokens=96,
        seed=5,
        stop_rule="espo",
        state=EAGER,
        include=["regret", "z", "values"],
    )
    stopped = check_espo_decisions(out, shadow=False)
    assert len(stopped) >= 4, out["usage"]
    for t in stopped:
        assert t["end_reason"] == "espo_stop"
        assert len(t["token_ids"]) == len(t["logprobs"]) == t["stop_step"] + 1
        assert t["reward"] == -1.0
    for t in out["trajectories"]:
        if t["end_reason"] != "espo_stop":
            assert t["stop_step"] is None and t["reward"] is None
    usage = out["usage"]
    assert usage["stopped"] == len(stopped)
    assert usage["critic_calls"] >= len(stopped)
    assert usage["tokens_saved_upper_bound"] == sum(96 - (t["stop_step"] + 1) for t in stopped)
    assert usage["discarded_tokens"] == sum(t["discarded_tokens"] for t in out["trajectories"])
    # learner-owned state: the server's own is untouched, state_after is the update of the one sent
    assert out["state_used"] == EAGER
    assert out["state_after"]["batches"] == EAGER["batches"] + 1
    # the learner's own update (same pure code) gives the server's state_after
    mine = update_learner_state(EspoState(**EAGER), RolloutResponse(**out))
    assert asdict(mine) == pytest.approx(out["state_after"])
    assert httpx.get(rollout_server.url + "/v1/espo/state", timeout=10).json() == server_state


def test_shadow_mode_runs_to_the_end(rollout_server):
    common = dict(prompts=[{"token_ids": PROMPT}], n=8, max_tokens=96, seed=21, state=EAGER)
    plain = rollouts(rollout_server, stop_rule="none", **common)
    shadow = rollouts(
        rollout_server, stop_rule="espo", shadow=True, include=["regret", "z", "values"], **common
    )
    would = check_espo_decisions(shadow, shadow=True)
    assert len(would) >= 2, shadow["usage"]
    for a, b in zip(plain["trajectories"], shadow["trajectories"], strict=True):
        assert a["token_ids"] == b["token_ids"]  # same seeds, nothing cut
        assert b["end_reason"] in ("eos", "length") and b["stop_step"] is None
    usage = shadow["usage"]
    assert usage["stopped"] == 0 and usage["shadow_stopped"] == len(would)
    assert usage["tokens_saved_shadow"] == sum(len(t["token_ids"]) - t["shadow_stop_step"] - 1 for t in would)


def test_client_disconnect_aborts_engine_requests(rollout_server):
    """A plain (not streamed) call whose client goes away: its samples are aborted. 12 x 32 samples of
    480 tokens take 8 waves of the engine's 48 slots, so the call is still running (every one of
    its samples counted in flight from its start) long after the wait below sees it."""
    cancelled_before = metric(rollout_server, "espo_rollout_requests_total", outcome="cancelled")
    generated = metric(rollout_server, "vllm:generation_tokens_total")
    log_start = len(rollout_server.log_path.read_text(errors="replace"))
    prompts = [{"token_ids": [5, 6, 14 + p, 7]} for p in range(12)]
    body = json.dumps({"prompts": prompts, "n": 32, "max_tokens": 480, "ignore_eos": True}).encode()
    head = "POST /v1/rollouts HTTP/1.1\r\nHost: espo\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", rollout_server.port), timeout=60) as client:
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: metric(rollout_server, "espo_inflight_trajectories") == 384, "the call generates")
    # the client went away: the call is cancelled and its engine requests aborted
    wait_until(
        lambda: (
            metric(rollout_server, "espo_rollout_requests_total", outcome="cancelled") > cancelled_before
            and metric(rollout_server, "espo_inflight_trajectories") == 0
            and metric(rollout_server, "vllm:num_requests_running") == 0
        ),
        "the engine requests aborted after the client went away",
    )
    assert metric(rollout_server, "vllm:generation_tokens_total") - generated < 384 * 480
    # and the server goes on serving
    assert rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], max_tokens=4)["trajectories"]
    # an expected event, logged as such: not an "Exception in ASGI application" traceback
    log = rollout_server.log_path.read_text(errors="replace")[log_start:]
    assert "client disconnected; rollout cancelled" in log and "Traceback" not in log, log[-3000:]


BAD_INPUTS = [
    ({"n": 0}, "n"),
    ({"n": 10_000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"prompts": [{"token_ids": [5, 99_999]}]}, "prompts[0].token_ids"),
    ({"prompts": [{"token_ids": [-1]}]}, "prompts[0].token_ids"),
    ({"prompts": [{"token_ids": []}]}, "prompts[0]"),
    ({"prompts": [{"text": ""}]}, "prompts[0]"),
    ({"prompts": []}, "prompts"),
    ({"prompts": [{"token_ids": [5] * 500}], "max_tokens": 50}, "prompts[0]"),
    ({"stop_rule": "bogus"}, "stop_rule"),
    ({"rule_params": {"bogus": 1}}, "rule_params.bogus"),
    ({"rule_params": {"tau": 2}}, "rule_params.tau"),
    ({"rule_params": {"beta_min": 5, "beta_max": 1}}, "rule_params.beta_max"),
    ({"rule_params": {"beta_min": 0.0, "eta_beta": 1.0, "tau": 1.0}}, "rule_params.beta_min"),
    ({"temprature": 0.5}, "temprature"),
    ({"stop_token_ids": [10_000]}, "stop_token_ids"),
    ({"include": ["everything"]}, "include[0]"),
    ({"temperature": 5.0}, "temperature"),  # vLLM refuses > 2: a 400 here, never its error as a 503
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
]


def test_the_largest_seed_wraps_for_every_sample(rollout_server):
    """seed + i*n + j past 2**63 - 1 wraps (it once overflowed vLLM's generator: a 503), so sample j
    of the largest seed is the sample of seed j - 1; the random rule's draw takes the seed too."""
    body = {"prompts": [{"token_ids": PROMPT}], "max_tokens": 6, "stop_rule": "none"}
    top = rollouts(rollout_server, **body, n=3, seed=2**63 - 1)["trajectories"]
    low = rollouts(rollout_server, **body, n=2, seed=0)["trajectories"]
    top, low = (sorted(ts, key=lambda t: t["sample_index"]) for ts in (top, low))
    assert [t["token_ids"] for t in top[1:]] == [t["token_ids"] for t in low]
    drawn = rollouts(rollout_server, **{**body, "stop_rule": "random"}, n=3, seed=2**63 - 1)
    assert len(drawn["trajectories"]) == 3


@pytest.mark.parametrize(("patch", "param"), BAD_INPUTS, ids=[p for _, p in BAD_INPUTS])
def test_bad_input_is_answered_4xx_and_server_keeps_serving(rollout_server, patch, param):
    body = {"prompts": [{"token_ids": PROMPT}], "max_tokens": 8, **patch}
    r = post(rollout_server, body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]
    ok = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], max_tokens=4)
    assert len(ok["trajectories"]) == 1


def test_not_json_and_wrong_types(rollout_server, tmp_path):
    r = httpx.post(
        rollout_server.url + "/v1/rollouts",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(rollout_server, {"prompts": [{"token_ids": PROMPT}], "n": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.put(rollout_server.url + "/v1/espo/state", json={"beta": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "beta"
    r = httpx.post(rollout_server.url + "/v1/weights", json={"path": str(tmp_path / "nothing")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"  # inside --weights-dir, empty
    r = httpx.post(rollout_server.url + "/v1/weights", json={"path": "/etc"}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["param"] == "path"  # outside: nobody loads any path
    assert rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], max_tokens=4)["policy_version"] >= 0


def test_server_owned_state_batches_and_commit(rollout_server):
    url = rollout_server.url
    fresh = {"mu": 0.0, "var": 1.0, "beta": 7.0, "warm": False, "initialised": False, "batches": 0}
    assert httpx.put(url + "/v1/espo/state", json=fresh, timeout=10).json()["state"] == fresh
    # first batch: initialises mu/var, stops nothing even though the rule is espo
    first = rollouts(
        rollout_server, prompts=[{"token_ids": PROMPT}], n=8, max_tokens=48, seed=1, stop_rule="espo"
    )
    assert first["usage"]["stopped"] == 0 and first["usage"]["critic_calls"] == 0
    s1 = first["state_after"]
    assert s1["initialised"] and s1["batches"] == 1
    u = first["usage"]
    assert s1["mu"] == pytest.approx(u["regret_sum"] / u["regret_tokens"])
    # two calls of one batch: both run with the state from when the batch opened; update at commit
    a = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=4, max_tokens=32, seed=2, batch_id="b1")
    b = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=4, max_tokens=32, seed=3, batch_id="b1")
    assert a["state_used"] == b["state_used"] == s1
    assert a["state_after"] is None and b["state_after"] is None
    st = httpx.get(url + "/v1/espo/state", timeout=10).json()
    assert st["open_batch_id"] == "b1" and st["open_batch_calls"] == 2 and st["state"] == s1
    committed = httpx.post(url + "/v1/espo/commit", json={"batch_id": "b1"}, timeout=10).json()
    assert committed["open_batch_id"] is None and committed["state"]["batches"] == 2
    n = a["usage"]["regret_tokens"] + b["usage"]["regret_tokens"]
    g_mean = (a["usage"]["regret_sum"] + b["usage"]["regret_sum"]) / n
    assert committed["state"]["mu"] == pytest.approx(0.99 * s1["mu"] + 0.01 * g_mean)
    r = httpx.post(url + "/v1/espo/commit", json={"batch_id": "nope"}, timeout=10)
    assert r.status_code == 200  # nothing open: a no-op
    assert metric(rollout_server, "espo_state_batches") == 2


def test_streaming_ndjson_and_idempotent_retry(rollout_server):
    body = {
        "prompts": [{"token_ids": PROMPT}],
        "n": 4,
        "max_tokens": 24,
        "seed": 9,
        "request_id": "retry-me-1",
    }
    lines = []
    with httpx.stream("POST", rollout_server.url + "/v1/rollouts?stream=true", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [x["type"] for x in lines] == ["trajectory"] * 4 + ["group", "done"]  # n=4 of one prompt
    again = rollouts(rollout_server, **body)  # a retry gets the first call's samples, not new ones
    streamed = sorted((x["trajectory"] for x in lines[:4]), key=lambda t: t["sample_index"])
    assert [t["token_ids"] for t in again["trajectories"]] == [t["token_ids"] for t in streamed]
    bad = post(rollout_server, {**body, "n": 0}, params={"stream": "true"})
    assert bad.status_code == 400


def test_text_prompts_entropy_and_metrics(rollout_server):
    out = rollouts(
        rollout_server,
        prompts=[{"text": "12+3="}],
        n=2,
        max_tokens=16,
        seed=4,
        include=["entropy"],
        entropy_top_k=8,
    )
    for t in out["trajectories"]:
        ent = t["traces"]["entropy"]
        assert len(ent) == len(t["token_ids"])
        # a near-uniform random policy over 53 tokens: entropy close to log(53)
        assert all(3.0 < e <= np.log(53) + 1e-6 for e in ent)
    info = httpx.get(rollout_server.url + "/v1/info", timeout=10).json()
    assert info["critic"] == "remote" and info["vocab_size"] == 53


def test_metrics_move_by_what_the_responses_report(rollout_server):
    """Counters read with the exposition parser move by exactly what the call's usage says."""
    watched = {
        "espo_generated_tokens_total": {"rule": "espo"},
        "espo_stopped_trajectories_total": {"rule": "espo"},
        "espo_discarded_tokens_total": {},
        "espo_engine_tokens_total": {"rule": "espo"},
        "espo_tokens_saved_estimate_total": {},
        "espo_critic_calls_total": {},
        "espo_critic_latency_seconds_count": {},
        "espo_trajectories_total": {"rule": "espo"},
        "espo_rollout_requests_total": {"outcome": "ok"},
        "vllm:generation_tokens_total": {},
    }
    before = {name: metric(rollout_server, name, **labels) for name, labels in watched.items()}
    out = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=12, max_tokens=48, seed=21,
                   stop_rule="espo", state=EAGER)  # fmt: skip
    moved = {name: metric(rollout_server, name, **labels) - before[name] for name, labels in watched.items()}
    usage = out["usage"]
    assert usage["stopped"] > 0 and usage["critic_calls"] > 0, usage  # the eager state stops some
    assert moved["espo_generated_tokens_total"] == usage["generated_tokens"]
    assert moved["espo_stopped_trajectories_total"] == usage["stopped"]
    assert moved["espo_discarded_tokens_total"] == usage["discarded_tokens"]
    assert moved["espo_engine_tokens_total"] == usage["engine_tokens"]
    assert usage["engine_tokens"] == usage["generated_tokens"] + usage["discarded_tokens"]
    assert moved["espo_tokens_saved_estimate_total"] == usage["tokens_saved_estimate"]
    assert moved["espo_critic_calls_total"] == usage["critic_calls"]
    assert moved["espo_critic_latency_seconds_count"] == usage["critic_calls"] - usage["critic_errors"]
    assert moved["espo_trajectories_total"] == 12
    assert moved["espo_rollout_requests_total"] == 1
    for reason in ("eos", "length", "espo_stop"):
        count = sum(t["end_reason"] == reason for t in out["trajectories"])
        assert metric(rollout_server, "espo_trajectories_total", rule="espo", end_reason=reason) >= count
    # vLLM's own counter saw at least the kept tokens, and the discarded ones too
    assert moved["vllm:generation_tokens_total"] >= usage["engine_tokens"]


def test_toy_verifier_rewards_eos_trajectories_with_an_answer(rollout_server):
    # many stop tokens: most samples end early with eos; the random policy's answers are wrong
    out = rollouts(rollout_server, prompts=[{"text": "1+2=", "answer": "3"}, {"text": "1+2="}], n=4,
                   max_tokens=32, seed=3, stop_token_ids=list(range(4, 40)))  # fmt: skip
    scored = [t for t in out["trajectories"] if t["end_reason"] == "eos" and t["prompt_index"] == 0]
    assert scored, "expected eos trajectories"
    assert all(t["reward"] == 0.0 for t in scored)
    assert all(t["reward"] is None for t in out["trajectories"] if t not in scored)
    assert httpx.get(rollout_server.url + "/v1/info", timeout=10).json()["verifier"] == "toy"
