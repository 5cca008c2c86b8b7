"""Score returned trajectories on the toy task: accuracy, stops, false stops, detection delay, and
the oracle's token savings. Pure functions (no torch, no I/O).

A trajectory is a dict or an object (e.g. `espo_client.protocol.Trajectory`) with `prompt_index`,
`token_ids` (response only), `end_reason` in {eos, length, espo_stop, abort}, `stop_step` and
`shadow_stop_step`. `prompt_index` indexes the `problems` list.

Whether a trajectory is correct:
- eos: the verifier's verdict on the response (the trailing EOS token removed).
- length: False. A truncated response gets no task reward (section 3 of the design).
- espo_stop / abort: unknowable from the trajectory itself (None), unless a *twin* is given: the
  same sample generated to its end (e.g. the same prompt and seed in a shadow-mode call). The twin
  is trusted only if its tokens start with the stopped trajectory's tokens (a sampler may diverge,
  e.g. under a different batch composition); then its outcome and first wrong index are used.

accuracy: trajectories that ended with EOS and are correct / all trajectories (a stop counts as
a failure: it earned r_fail, whatever its twin says).

A "stop event" is a real stop (`espo_stop`, at `stop_step`) or a shadow stop (`shadow_stop_step`).
- false-stop rate: stop events whose trajectory is known to be correct / stop events whose
  correctness is known. Shadow stops are always judged (the run went on to the end); real stops
  only through a twin.
- detection delay: stop step minus first wrong index, for stop events on trajectories not known to
  be correct whose first wrong token is known. Negative: stopped before the first mistake.
- oracle tokens saved: for each trajectory that ran to its end (eos, length) and failed with a
  first wrong token f, the tokens after it: len - (f + 1). The best any stop rule could save.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

from espo_server.toy.task import Problem, decode, verify

RAN_TO_END = ("eos", "length")


@dataclass(frozen=True)
class Outcome:
    prompt_index: int
    end_reason: str
    n_tokens: int
    text: str  # the decoded response, EOS removed; one character per token
    correct: bool | None  # None: unknowable (stopped or aborted, and no usable twin)
    first_wrong: int | None  # token index of the first deviation from the canonical solution
    stop_step: int | None
    shadow_stop_step: int | None
    twin_used: bool = False
    twin_mismatch: bool = False  # a twin was given but its tokens diverged: ignored


def _get(traj: Any, name: str, default: Any = None) -> Any:
    return traj.get(name, default) if isinstance(traj, Mapping) else getattr(traj, name, default)


def outcome(problem: Problem, traj: Any, twin: Any | None = None) -> Outcome:
    """The facts about one trajectory that the metrics need."""
    ids = list(_get(traj, "token_ids", []) or [])
    end_reason = str(_get(traj, "end_reason", ""))
    text, _ = decode(ids, strip_eos=end_reason == "eos")  # elsewhere an EOS is just a wrong token
    verdict = verify(problem.prompt, text, problem.answer, finished=end_reason == "eos")
    correct: bool | None = verdict.correct if end_reason in RAN_TO_END else None
    if end_reason == "length":
        correct = False
    first_wrong = verdict.first_wrong_index
    twin_used = twin_mismatch = False
    if twin is not None and correct is None:
        twin_out = outcome(problem, twin)
        if list(_get(twin, "token_ids", []))[: len(ids)] == ids and twin_out.end_reason in RAN_TO_END:
            correct, twin_used = twin_out.correct, True
            if first_wrong is None:
                first_wrong = twin_out.first_wrong
        else:
            twin_mismatch = True
    return Outcome(
        prompt_index=int(_get(traj, "prompt_index")),
        end_reason=end_reason,
        n_tokens=len(ids),
        text=text,
        correct=correct,
        first_wrong=first_wrong,
        stop_step=_get(traj, "stop_step"),
        shadow_stop_step=_get(traj, "shadow_stop_step"),
        twin_used=twin_used,
        twin_mismatch=twin_mismatch,
    )


def evaluate(
    problems: Sequence[Problem],
    trajectories: Sequence[Any],
    twins: Mapping[int, Any] | None = None,
) -> dict:
    """Metrics of one set of trajectories. `twins` maps a position in `trajectories` to that
    trajectory's run-to-the-end twin (used only for stopped or aborted ones)."""
    twins = twins or {}
    outs = [outcome(problems[_get(t, "prompt_index")], t, twins.get(i)) for i, t in enumerate(trajectories)]
    n = len(outs)
    tokens = sum(o.n_tokens for o in outs)

    stop_events = [(o, o.stop_step) for o in outs if o.end_reason == "espo_stop" and o.stop_step is not None]
    stop_events += [(o, o.shadow_stop_step) for o in outs if o.shadow_stop_step is not None]
    judged = [o for o, _ in stop_events if o.correct is not None]
    false_stops = sum(bool(o.correct) for o in judged)
    delays = [
        step - o.first_wrong for o, step in stop_events if o.correct is not True and o.first_wrong is not None
    ]

    ran = [o for o in outs if o.end_reason in RAN_TO_END]
    failing = [o for o in ran if o.correct is False and o.first_wrong is not None]
    known_failing_stops = sum(o.correct is False for o, _ in stop_events)
    oracle = sum(max(0, o.n_tokens - (o.first_wrong + 1)) for o in failing)
    shadow_saved = sum(
        max(0, o.n_tokens - (o.shadow_stop_step + 1)) for o in outs if o.shadow_stop_step is not None
    )

    return {
        "n": n,
        # what the learner was paid for: a stopped trajectory is a failure even if its twin was right
        "accuracy": sum(o.end_reason == "eos" and o.correct is True for o in outs) / n if n else None,
        "unknown_correctness": sum(o.correct is None for o in outs),
        "tokens_generated": tokens,
        "mean_length": tokens / n if n else None,
        "end_reasons": {
            r: sum(o.end_reason == r for o in outs) for r in sorted({o.end_reason for o in outs})
        },
        "stop_rate": sum(o.end_reason == "espo_stop" for o in outs) / n if n else None,
        "shadow_stop_rate": sum(o.shadow_stop_step is not None for o in outs) / n if n else None,
        "stops_judged": len(judged),
        "false_stops": false_stops,
        "false_stop_rate": false_stops / len(judged) if judged else None,
        "detection_delays": len(delays),
        "median_detection_delay": median(delays) if delays else None,
        "premature_stops": sum(d < 0 for d in delays),  # stopped before the first wrong token
        "failing_ran_to_end": len(failing),
        # stop events on trajectories known to fail: over failing_ran_to_end, the share of failures caught
        "failing_stopped": known_failing_stops,
        "oracle_tokens_saved": oracle,
        "oracle_fraction_saved": oracle / tokens if tokens else None,
        "shadow_tokens_saved": shadow_saved,
        "twins_used": sum(o.twin_used for o in outs),
        "twins_mismatched": sum(o.twin_mismatch for o in outs),
    }
