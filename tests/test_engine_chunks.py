"""bench/logprobs_cost.py: the engine's chunks from vLLM's per-token dicts (what the server asks
for) and the same chunks read from vLLM's flat logprobs, through vLLM's own LogprobsProcessor (no
engine: the engine core's outputs are made up, the processing is vLLM's)."""

from __future__ import annotations

import pytest

from bench import logprobs_cost


def test_flat_and_dict_logprobs_give_the_same_chunks():
    steps = logprobs_cost.engine_steps(requests=8, tokens=40, seed=3)
    assert any(s == t for request in steps for s, t, *_ in request)  # the sampled token is the top one
    assert any(s != t for request in steps for s, t, *_ in request)  # and it is not
    flat, _ = logprobs_cost.run(steps, flat=True)
    by_dict, _ = logprobs_cost.run(steps, flat=False)
    assert flat == by_dict
    for request, chunks in zip(steps, flat, strict=True):
        assert [c.token_ids for c in chunks] == [[s] for s, *_ in request]
        for (_, _, sampled_lp, top_lp, _), chunk in zip(request, chunks, strict=True):
            assert chunk.logprobs == [pytest.approx(sampled_lp, abs=1e-6)]  # float32 on the wire
            assert chunk.top_logprobs == [pytest.approx(top_lp, abs=1e-6)]


def test_the_flat_form_holds_less_per_token():
    steps = logprobs_cost.engine_steps(requests=4, tokens=64, seed=0)
    assert logprobs_cost.held_bytes(steps, flat=True) < logprobs_cost.held_bytes(steps, flat=False) / 1.5


def test_the_bench_prints_its_ratio(capsys):
    result = logprobs_cost.main(["--requests", "4", "--tokens", "16", "--repeats", "1"])
    assert result["flat_us_per_token"] > 0 and result["dict_us_per_token"] > 0
    assert "flat / dict CPU" in capsys.readouterr().out
