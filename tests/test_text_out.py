"""Text in, text out on POST /v1/rollouts: decoded text per trajectory (`include: ["text"]`), the
prompts' token ids for text prompts, the top-k logprobs trace and stop strings."""

from __future__ import annotations

import json

import httpx
import pytest

from espo_server.tiny_model import build_tokenizer

pytestmark = pytest.mark.vllm


def rollouts(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/rollouts", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_text_and_prompt_token_ids(inprocess_server):
    tokenizer = build_tokenizer()
    out = rollouts(
        inprocess_server,
        prompts=[{"text": "7+5+9="}, {"token_ids": [5, 6, 14]}],
        n=2,
        max_tokens=20,
        seed=3,
        include=["text", "top_logprobs"],
        top_logprobs=3,
    )
    assert out["prompt_token_ids"] == [tokenizer.encode("7+5+9="), [5, 6, 14]]
    for t in out["trajectories"]:
        assert t["text"] == tokenizer.decode(t["token_ids"], skip_special_tokens=True)
        top_ids, top_lps = t["traces"]["top_token_ids"], t["traces"]["top_logprobs"]
        assert len(top_ids) == len(top_lps) == len(t["token_ids"])
        for ids, lps, token, lp in zip(top_ids, top_lps, t["token_ids"], t["logprobs"], strict=True):
            assert len(ids) == len(lps) == 3 and lps == sorted(lps, reverse=True)
            assert lps[0] >= lp - 1e-6  # the most likely token is at least as likely as the sampled one
            if token in ids:
                assert lps[ids.index(token)] == pytest.approx(lp, abs=1e-6)
        assert t["traces"]["regret"] is None  # only what was asked for

    plain = rollouts(inprocess_server, prompts=[{"token_ids": [5, 6, 14]}], max_tokens=4)
    assert plain["prompt_token_ids"] is None and plain["trajectories"][0]["text"] is None

    lines = httpx.post(
        inprocess_server.url + "/v1/rollouts?stream=true",
        json={"prompts": [{"text": "1+1="}], "max_tokens": 4, "include": ["text"]},
        timeout=300,
    ).text.splitlines()
    done = json.loads(lines[-1])
    assert done["type"] == "done" and done["response"]["prompt_token_ids"] == [tokenizer.encode("1+1=")]
    assert json.loads(lines[0])["trajectory"]["text"] is not None


def test_stop_strings_end_trajectories_as_eos(inprocess_server):
    free = rollouts(
        inprocess_server, prompts=[{"token_ids": [5, 6]}], n=8, max_tokens=40, seed=8, include=["text"]
    )
    texts = [t["text"] for t in free["trajectories"]]
    stop = next(ch for ch in "abcdefghijklmnop" if sum(ch in t for t in texts) >= 2)
    out = rollouts(
        inprocess_server,
        prompts=[{"token_ids": [5, 6]}],
        n=8,
        max_tokens=40,
        seed=8,
        include=["text"],
        stop=[stop],
    )
    for before, t in zip(free["trajectories"], out["trajectories"], strict=True):
        if stop in before["text"]:
            assert t["end_reason"] == "eos" and t["text"].endswith(stop)
            assert before["text"].startswith(t["text"])
        else:
            assert t["token_ids"] == before["token_ids"]
