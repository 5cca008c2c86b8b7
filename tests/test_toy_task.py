"""The toy task: problem generator, verifier, char-level encoding, and trajectory evaluation."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from espo_server.tiny_model import EOS_ID, VOCAB
from espo_server.toy.evaluate import evaluate, outcome
from espo_server.toy.task import (
    UNKNOWN_CHAR,
    TaskSpec,
    decode,
    encode,
    generate,
    solve,
    split_of,
    verify,
)

PROMPT = "7+5+9+2="
SOLUTION = "7+5=12;12+9=21;21+2=23;#23"


def test_solve_writes_the_running_result():
    p = solve(PROMPT)
    assert p is not None
    assert (p.prompt, p.solution, p.answer) == (PROMPT, SOLUTION, "23")
    assert solve("10-3+4=").solution == "10-3=7;7+4=11;#11"
    assert solve("1-5=").solution == "1-5=-4;#-4"
    for bad in ("", "7+5", "7+=", "a+b=", "7*5=", "=7"):
        assert solve(bad) is None


def test_generator_is_deterministic_by_seed():
    a = generate(50, "train", seed=3)
    assert a == generate(50, "train", seed=3)
    assert a != generate(50, "train", seed=4)
    assert len({p.prompt for p in a}) == 50  # distinct


def test_generator_follows_the_spec():
    spec = TaskSpec(min_terms=5, max_terms=5, low=10, high=12, ops="+-")
    problems = generate(200, "train", seed=0, spec=spec)
    for p in problems:
        nums = [int(x) for x in re.findall(r"\d+", p.prompt)]
        assert len(nums) == 5 and all(10 <= x <= 12 for x in nums)
        assert p.solution.count(";") == 4 and p.solution.endswith("#" + p.answer)
        assert eval(p.prompt[:-1]) == int(p.answer)  # digits and +/- only
        assert set(p.prompt + p.solution) <= set(VOCAB)
    assert any(p.answer.startswith("-") for p in problems)  # negative running results occur


def test_splits_do_not_overlap():
    train = {p.prompt for p in generate(3000, "train", seed=0)}
    test = {p.prompt for p in generate(500, "test", seed=0)}
    assert not train & test
    assert all(split_of(p) == "test" for p in test)
    # disjoint whatever the seeds: the split is a function of the problem text
    assert not {p.prompt for p in generate(500, "test", seed=7)} & train
    with pytest.raises(ValueError):
        generate(1, "valid")


def test_encode_decode_char_level():
    ids = encode(PROMPT + SOLUTION)
    assert len(ids) == len(PROMPT + SOLUTION)
    assert decode(ids) == (PROMPT + SOLUTION, False)
    assert decode([*ids, EOS_ID]) == (PROMPT + SOLUTION, True)
    assert decode([*ids, EOS_ID], strip_eos=False)[0].endswith(UNKNOWN_CHAR)
    text, finished = decode([*encode("1+"), 0, 1, 999, *encode("2")])  # pad, bos, out of range
    assert text == "1+" + UNKNOWN_CHAR * 3 + "2" and not finished


@pytest.mark.parametrize(
    ("response", "finished", "reward", "first_wrong"),
    [
        (SOLUTION, True, 1.0, None),  # canonical
        ("7+5=13;13+9=22;22+2=24;#24", True, 0.0, 5),  # first step wrong, consistent after it
        ("7+5=12;12+9=21;21+2=24;#24", True, 0.0, 21),  # last step wrong
        ("7+5=12;12+9=21;21+2=23;#24", True, 0.0, 25),  # wrong final answer only
        ("7+5=11;#23", True, 1.0, 5),  # right answer by a wrong path: rewarded, deviation still found
        ("7+5=12;12+9", True, 0.0, 11),  # EOS too early: the EOS token (index 11) is the mistake
        ("7+5=12;12+9", False, 0.0, None),  # truncated: nothing wrong generated yet
        (SOLUTION + ";", True, 0.0, len(SOLUTION)),  # went on where EOS was due
        (SOLUTION + "3", True, 0.0, len(SOLUTION)),  # "#233"
        ("", True, 0.0, 0),  # immediate EOS
        ("", False, 0.0, None),
        ("zz?? ##", True, 0.0, 0),  # garbage
        ("#23", True, 1.0, 0),  # the answer alone: correct, but not the canonical path
        ("# 23", True, 0.0, 0),
        ("7+5=12;#23#23", True, 0.0, 7),
        ("7+5=12;12+9=21;21+2=23;#" + UNKNOWN_CHAR, True, 0.0, 24),
    ],
)
def test_verify(response, finished, reward, first_wrong):
    v = verify(PROMPT, response, finished=finished)
    assert v.reward == reward
    assert v.correct is (reward == 1.0)
    assert v.first_wrong_index == first_wrong


def test_verify_is_robust_and_takes_an_expected_answer():
    assert verify(PROMPT, "#99", answer="99").correct  # the given answer wins over the prompt's
    v = verify("not a problem", "#5", answer="5")
    assert v.correct and v.first_wrong_index is None  # no canonical solution to compare with
    v = verify("not a problem", "#5")
    assert not v.correct and v.reward == 0.0 and v.first_wrong_index is None
    assert verify(PROMPT, None).reward == 0.0  # type: ignore[arg-type]
    assert verify(None, SOLUTION).reward == 0.0  # type: ignore[arg-type]
    assert verify(" " + PROMPT + "\n", SOLUTION).correct  # whitespace around a decoded prompt
    v = verify(PROMPT, "7+5=12;12+9</s>", finished=False)  # decoded with special tokens
    assert v.first_wrong_index == 11 and not v.correct
    assert verify(PROMPT, SOLUTION + "</s>").correct


# --- evaluate ---


def _traj(i, text, end_reason, eos=None, stop_step=None, shadow_stop_step=None):
    eos = end_reason == "eos" if eos is None else eos
    ids = encode(text) + ([EOS_ID] if eos else [])
    return {
        "prompt_index": i,
        "token_ids": ids,
        "end_reason": end_reason,
        "stop_step": stop_step,
        "shadow_stop_step": shadow_stop_step,
    }


def test_evaluate_hand_made_trajectories():
    problems = [solve(PROMPT), solve("1+2+3=")]  # second solution: "1+2=3;3+3=6;#6"
    wrong = "7+5=13;13+9=22;22+2=24;#24"
    trajs = [
        _traj(0, SOLUTION, "eos"),  # correct, 27 tokens
        _traj(0, wrong, "eos", shadow_stop_step=8),  # failing from 5; shadow stop 3 tokens later
        _traj(1, "1+2=3;3+3=6;#6", "eos", shadow_stop_step=4),  # correct: a false shadow stop
        _traj(1, "1+2=4;4+", "espo_stop", stop_step=7),  # real stop, own first wrong at 4
        _traj(0, "7+5=12", "espo_stop", stop_step=5),  # real stop before any mistake; twin below
        _traj(0, "7+5=12;12+9=21;21+2=2", "length"),  # truncated, no mistake: not failing
        SimpleNamespace(
            prompt_index=1, token_ids=[], end_reason="abort", stop_step=None, shadow_stop_step=None
        ),
    ]
    twins = {4: _traj(0, SOLUTION, "eos")}
    m = evaluate(problems, trajs, twins)
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(2 / 7)
    assert m["unknown_correctness"] == 2  # the own-evidence stop and the abort
    assert m["tokens_generated"] == 27 + 27 + 15 + 8 + 6 + 21 + 0
    assert m["end_reasons"] == {"abort": 1, "eos": 3, "espo_stop": 2, "length": 1}
    assert m["stop_rate"] == pytest.approx(2 / 7)
    assert m["shadow_stop_rate"] == pytest.approx(2 / 7)
    # judged stop events: trajectory 1 (failing), 2 (correct), 4 (correct, via its twin)
    assert (m["stops_judged"], m["false_stops"]) == (3, 2)
    assert m["false_stop_rate"] == pytest.approx(2 / 3)
    # delays: trajectory 1: 8 - 5; trajectory 3: 7 - 4 (correct ones are excluded)
    assert (m["detection_delays"], m["median_detection_delay"], m["premature_stops"]) == (2, 3, 0)
    assert m["failing_ran_to_end"] == 1
    assert m["failing_stopped"] == 1  # trajectory 1; trajectory 3's correctness is unknown
    assert m["oracle_tokens_saved"] == 27 - (5 + 1)
    assert m["shadow_tokens_saved"] == (27 - 9) + (15 - 5)
    assert (m["twins_used"], m["twins_mismatched"]) == (1, 0)


def test_evaluate_twins_and_premature_stops():
    problems = [solve(PROMPT)]
    stopped = _traj(0, "7+5=1", "espo_stop", stop_step=4)
    failing_twin = _traj(0, "7+5=13;13+9=22;22+2=24;#24", "eos")  # same first 5 tokens, fails at 5
    o = outcome(problems[0], stopped, failing_twin)
    assert (o.correct, o.first_wrong, o.twin_used) == (False, 5, True)
    m = evaluate(problems, [stopped], {0: failing_twin})
    assert (m["false_stops"], m["median_detection_delay"], m["premature_stops"]) == (0, -1, 1)

    diverged = _traj(0, "8+5=13;#13", "eos")  # tokens differ from the stopped prefix: not a twin
    o = outcome(problems[0], stopped, diverged)
    assert (o.correct, o.twin_used, o.twin_mismatch) == (None, False, True)
    m = evaluate(problems, [stopped], {0: diverged})
    assert m["stops_judged"] == 0 and m["false_stop_rate"] is None and m["twins_mismatched"] == 1


def test_evaluate_eos_inside_a_stopped_response_is_a_token():
    problems = [solve(PROMPT)]
    o = outcome(problems[0], _traj(0, "7+5", "length", eos=True))  # an EOS kept, not the end reason
    assert o.n_tokens == 4 and o.text == "7+5" + UNKNOWN_CHAR and o.first_wrong == 3
    assert evaluate(problems, [])["n"] == 0
