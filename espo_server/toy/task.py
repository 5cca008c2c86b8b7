"""The toy reasoning task: chained arithmetic with the running result written out step by step.

    prompt    7+5+9+2=
    solution  7+5=12;12+9=21;21+2=23;#23        (then EOS)

Every step depends on the previous result, so one wrong early step leaves a long, doomed tail of
tokens after it: the situation ESPO stops early. The tokenizer is char-level (one token per
character, `tiny_model.VOCAB`), so a character index in a response is also its token index.

Pure Python (no torch): the server imports `verify` as a reward function.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from espo_server.tiny_model import EOS_ID, VOCAB

SPLITS = ("train", "test")
EOS_TEXT = VOCAB[EOS_ID]  # "</s>"
_PROMPT_RE = re.compile(r"^(\d+)((?:[+-]\d+)+)=$")
_TERM_RE = re.compile(r"([+-])(\d+)")


@dataclass(frozen=True)
class TaskSpec:
    """Problem distribution. Defaults give 4-6 operands in 1..30, i.e. 3-5 steps, ~30-45 tokens."""

    min_terms: int = 4
    max_terms: int = 6
    low: int = 1
    high: int = 30
    ops: str = "+"  # "+-" adds subtraction; running results may then be negative ("-3+5=2")
    test_fraction: float = 0.1  # share of the problem space (by hash of the prompt) in the test split


@dataclass(frozen=True)
class Problem:
    prompt: str  # "7+5+9+2="
    answer: str  # "23"
    solution: str  # "7+5=12;12+9=21;21+2=23;#23" (the canonical response, without EOS)


@dataclass(frozen=True)
class Verdict:
    reward: float  # 1.0 iff the answer after '#' is exactly the expected answer
    correct: bool
    first_wrong_index: int | None  # first response index deviating from the canonical solution
    answer: str | None  # what the response gave after '#', None when it has no '#'


def solve(prompt: str) -> Problem | None:
    """The canonical solution of a prompt like `7+5+9+2=`; None when the prompt is not one."""
    m = _PROMPT_RE.match(prompt.strip())
    if m is None:
        return None
    total = int(m.group(1))
    steps = []
    for op, num in _TERM_RE.findall(m.group(2)):
        new = total + int(num) if op == "+" else total - int(num)
        steps.append(f"{total}{op}{num}={new};")
        total = new
    return Problem(prompt=prompt.strip(), answer=str(total), solution="".join(steps) + f"#{total}")


def split_of(prompt: str, test_fraction: float = 0.1) -> str:
    """'train' or 'test', from a hash of the prompt text: the splits never share a problem."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def generate(n: int, split: str = "train", seed: int = 0, spec: TaskSpec | None = None) -> list[Problem]:
    """`n` distinct problems of one split, the same for the same (n, split, seed, spec)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    spec = spec or TaskSpec()
    rng = random.Random(f"{seed}:{split}")  # a string seed hashes deterministically across runs
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        k = rng.randint(spec.min_terms, spec.max_terms)
        nums = [rng.randint(spec.low, spec.high) for _ in range(k)]
        ops = [rng.choice(spec.ops) for _ in range(k - 1)]
        prompt = str(nums[0]) + "".join(f"{o}{x}" for o, x in zip(ops, nums[1:], strict=True)) + "="
        if prompt in seen or split_of(prompt, spec.test_fraction) != split:
            continue
        seen.add(prompt)
        problem = solve(prompt)
        assert problem is not None
        out.append(problem)
    return out


def verify(prompt: str, response: str, answer: str | None = None, *, finished: bool = True) -> Verdict:
    """Score a response (text without EOS; a trailing "</s>" is taken as EOS) to a prompt; never raises.

    - reward: 1.0 iff the response contains '#' and everything after the first '#' equals the
      expected answer exactly ("#23" right; "#23;", "#2", "# 23" wrong). The expected answer is
      `answer` when given, else computed from the prompt; reward 0.0 if neither is available.
    - first_wrong_index: the first index i with response[i] != solution[i], comparing against the
      canonical solution *followed by EOS*:
        * response == solution                      -> None
        * response deviates at i                    -> i
        * response is solution plus more characters -> len(solution) (where EOS was due)
        * response is a strict prefix of solution and `finished` (it ended with EOS)
                                                    -> len(response), the index of that EOS token
        * strict prefix and not `finished` (truncated by max_tokens or cut by a stop)
                                                    -> None: nothing wrong has been generated yet
      It is None as well when the prompt cannot be parsed (no canonical solution to compare with).
      A response may reach the right answer by another path: reward 1.0 with a first_wrong_index.
    """
    problem = solve(prompt) if isinstance(prompt, str) else None
    expected = answer if answer is not None else (problem.answer if problem else None)
    response = response if isinstance(response, str) else ""
    if response.endswith(EOS_TEXT):  # decoded with special tokens: the EOS marks the end
        response, finished = response[: -len(EOS_TEXT)], True
    given = response.split("#", 1)[1] if "#" in response else None
    correct = expected is not None and given is not None and given == str(expected).strip()

    first_wrong: int | None = None
    if problem is not None:
        sol = problem.solution
        n = min(len(response), len(sol))
        first_wrong = next((i for i in range(n) if response[i] != sol[i]), None)
        if first_wrong is None and len(response) != len(sol):
            if len(response) > len(sol):
                first_wrong = len(sol)
            elif finished:
                first_wrong = len(response)
    return Verdict(
        reward=1.0 if correct else 0.0, correct=correct, first_wrong_index=first_wrong, answer=given
    )


# --- char-level encoding (the same ids as tiny_model.build_tokenizer, without transformers) ---

_ID = {tok: i for i, tok in enumerate(VOCAB)}
UNKNOWN_CHAR = "\ufffd"  # stands for a special token inside a response, so indices stay aligned


def encode(text: str) -> list[int]:
    """Token ids of a text (no BOS): prompts are sent to the policy exactly like this."""
    unk = _ID["<unk>"]
    return [_ID.get(ch, unk) for ch in text]


def decode(token_ids: list[int], strip_eos: bool = True) -> tuple[str, bool]:
    """(response text, finished): one character per token (special tokens and unknown ids become
    UNKNOWN_CHAR); a trailing EOS, when `strip_eos`, is removed and reported as finished."""
    ids = list(token_ids)
    finished = strip_eos and bool(ids) and ids[-1] == EOS_ID
    if finished:
        ids = ids[:-1]
    chars = [VOCAB[i] if 0 <= i < len(VOCAB) and len(VOCAB[i]) == 1 else UNKNOWN_CHAR for i in ids]
    return "".join(chars), finished
