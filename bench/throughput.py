"""Saved tokens as saved time: batches larger than the engine's slots, and over-sampling.

Starts the embedded server (toy policy + in-process critic) with `--max-num-seqs` slots (64 by
default, so a batch of 1,024 trajectories is 16x over-subscribed and a stopped trajectory frees a
slot for one that waits). All calls use one warm, learner-owned ESPO state (mu, var from a first
`none` batch, beta = the demo's), so no call changes what the next one runs with. Then, alternating
the modes on each repeat, with the same problems and seeds per repeat:

  none       plain PPO rollouts: the wall time to finish the whole batch
  espo       the ESPO rule stopping for real
  random     the matched-rate ablation: random stops as frequent as espo's (first repeat; see
             `matched_random_rate`)
  over:none  B prompt groups wanted, `over` x B prompts sent, `return_groups: B`, leftovers aborted:
             the time to the first B complete groups
  over:espo  the same with espo

Prints, medians over repeats: wall time, tokens generated, trajectories/s, stop and false-stop rates
(a stop is false when the `none` twin, same prompt and seed, was correct), and the ratios to none's
full batch; then the CPU-seconds ledger: per batch, the CPU time of the policy engine's processes,
the critic engine's and the server's own process, and the critic's CPU-seconds per query.
Targets: espo wall <= 0.8 x none at <= 3% false stops; over-sampling's time to
B groups <= 0.7 x none's full batch.

    .venv/bin/python -m bench.throughput                    # 256 problems x n=4, 64 slots, 3 repeats
    .venv/bin/python -m bench.throughput --problems 64 --repeats 1    # a quick look
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

from bench import harness
from espo_client import EspoClient
from espo_server.toy.demo import DEMO_BETA
from espo_server.toy.evaluate import evaluate
from espo_server.toy.task import encode, generate

MODES = ("none", "espo", "random", "over:none", "over:espo")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--problems", type=int, default=256, help="prompt groups per batch (B)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the engine's slots")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--over", type=float, default=1.25, help="prompts sent per group wanted")
    parser.add_argument("--beta", type=float, default=DEMO_BETA)
    harness.add_common_args(parser, "throughput", url_help="a running embedded server (default: start one)")
    harness.add_toy_args(parser)
    args = parser.parse_args()

    # a server of ours needs the toy models; one given by --url only the task's problems
    task = harness.toy_task(args) if args.url else harness.toy_models(args).task
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    started = time.time()
    with (
        harness.embedded_server(args, "--max-num-seqs", str(args.max_num_seqs)) as url,
        EspoClient(base_url=url, timeout=3600) as client,
    ):
        info = client.info()
        ledger = harness.CpuLedger.of_url(url)
        placement = ledger.placement() if ledger else None
        print(f"load average {harness.load_average()}; cores allowed {placement}", flush=True)
        warmup = generate(args.problems, "train", seed=99, spec=task)
        plain = client.rollouts(
            prompts=[encode(p.prompt) for p in warmup], n=args.n, max_tokens=args.max_tokens, seed=1,
            stop_rule="none", state={"beta": args.beta}, include=[],
        )  # fmt: skip
        state = dataclasses.replace(plain.state_after, warm=True, beta=args.beta)
        random_rate = None
        for rep in range(args.repeats):
            problems = generate(int(args.problems * args.over) + 1, "test", seed=20_000 + rep, spec=task)
            for mode in MODES:
                if mode == "random" and random_rate is None:
                    random_rate = matched_random_rate(runs, args)
                row = run_mode(client, mode, problems, args, state, rep, random_rate, ledger)
                runs[mode].append(row)
                print(
                    f"  repeat {rep + 1}/{args.repeats} {mode:<10} {row['wall_s']:6.2f}s "
                    f"{row['tokens']:>7} tokens  stop rate {row['stop_rate']:.3f}",
                    flush=True,
                )
            twins = {i: t for i, t in enumerate(runs["none"][-1]["trajectories"])}
            for mode in ("espo", "random"):
                scored = evaluate(problems[: args.problems], runs[mode][-1].pop("trajectories"), twins)
                runs[mode][-1]["false_stop_rate"] = scored["false_stop_rate"]
                runs[mode][-1]["accuracy"] = scored["accuracy"]
            runs["none"][-1]["accuracy"] = evaluate(
                problems[: args.problems], runs["none"][-1].pop("trajectories")
            )["accuracy"]

    summary = summarise(runs, args)
    cpu = {mode: harness.ledger_summary(runs[mode]) for mode in MODES}
    result = {
        "config": vars(args) | {"engine_max_num_seqs": info.max_num_seqs, "random_rate": random_rate},
        "summary": summary,
        "cpu_seconds_per_batch": cpu,
        "placement": placement,
        "load_average_end": harness.load_average(),
        "machine": harness.machine(),
        "runs": runs,
        "wall_s": round(time.time() - started, 1),
    }
    harness.write_result(args.out, result)
    print_table(summary, args, info.max_num_seqs, random_rate)
    harness.print_ledger(cpu, unit="batch")
    print(f"wrote {args.out}")


def matched_random_rate(runs: dict[str, list[dict]], args) -> float:
    """`random_rate` that makes random stops as frequent as espo's (first repeat). `random` draws a
    stop step uniformly in [min_tokens, max_tokens) and only stops a trajectory still running
    there, so the rate is espo's stop rate divided by the chance that a drawn step falls inside a
    trajectory, estimated from the lengths of the first `none` batch (the same seeds)."""
    min_tokens = 8  # the rule's default (EspoParams.min_tokens)
    lengths = [len(t.token_ids) for t in runs["none"][0]["trajectories"]]
    inside = statistics.mean(max(0, n - min_tokens) / (args.max_tokens - min_tokens) for n in lengths)
    return min(1.0, runs["espo"][0]["stop_rate"] / max(inside, 1e-9))


def run_mode(client, mode, problems, args, state, rep, random_rate, ledger=None) -> dict:
    """One batch; the same seeds in every mode of a repeat, so `none` is every stop's twin."""
    over = mode.startswith("over:")
    rule = mode.split(":")[-1]
    wanted = problems[: args.problems]
    sent = problems if over else wanted
    body: dict = dict(
        prompts=[encode(p.prompt) for p in sent], n=args.n, max_tokens=args.max_tokens, seed=rep * 7919,
        stop_rule=rule, state=state,
    )  # fmt: skip
    if rule == "random":
        body["rule_params"] = {"random_rate": random_rate}
    if over:
        body["return_groups"] = args.problems
    with contextlib.ExitStack() as stack:
        cpu = stack.enter_context(ledger.measure()) if ledger else None
        started = time.perf_counter()
        out = client.rollouts(**body)
        wall = time.perf_counter() - started
    usage = out.usage
    returned = [t for t in out.trajectories if t.end_reason != "abort"]
    return {
        "wall_s": wall,
        "tokens": usage.generated_tokens,
        "trajectories": out.trajectories if not over else [],
        "complete_trajectories": len(returned),
        "groups_returned": usage.groups_returned,
        "aborted": usage.aborted,
        "stop_rate": usage.stopped / max(1, len(returned)),
        "critic_calls": usage.critic_calls,
        "discarded_tokens": usage.discarded_tokens,
        "cpu": cpu,
    }


def summarise(runs: dict[str, list[dict]], args) -> dict:
    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(values) if values else None

    none_wall = med("none", "wall_s") or 1.0
    out = {}
    for mode in MODES:
        wall = med(mode, "wall_s")
        out[mode] = {
            "wall_s": wall,
            "wall_s_all": [round(r["wall_s"], 3) for r in runs[mode]],
            "tokens": med(mode, "tokens"),
            "trajectories_per_s": (med(mode, "complete_trajectories") or 0) / wall if wall else None,
            "stop_rate": med(mode, "stop_rate"),
            "false_stop_rate": med(mode, "false_stop_rate"),
            "accuracy": med(mode, "accuracy"),
            "critic_calls": med(mode, "critic_calls"),
            "ratio_to_none": wall / none_wall if wall else None,
        }
    return out


def print_table(s: dict, args, slots: int | None, random_rate: float | None) -> None:
    print(
        f"\nToy task: {args.problems} groups x n={args.n} = {args.problems * args.n} trajectories per batch, "
        f"{slots} engine slots, max_tokens {args.max_tokens}; medians of {args.repeats} alternating repeats"
    )
    print(
        f"{'mode':<11} {'wall s':>7} {'tokens':>8} {'traj/s':>7} {'stop rate':>9} {'false stops':>11} "
        f"{'critic q':>8} {'/ none':>7}"
    )
    for mode, r in s.items():
        print(
            f"{mode:<11} {_f(r['wall_s'], '.2f'):>7} {_f(r['tokens'], '.0f'):>8} "
            f"{_f(r['trajectories_per_s'], '.1f'):>7} {_f(r['stop_rate'], '.3f'):>9} "
            f"{_f(r['false_stop_rate'], '.3f'):>11} {_f(r['critic_calls'], '.0f'):>8} "
            f"{_f(r['ratio_to_none'], '.3f'):>7}"
        )
    espo, over_none, over_espo = s["espo"], s["over:none"], s["over:espo"]
    print(
        f"random_rate {_f(random_rate)} (matched to espo's stop rate). over:* send {args.over:g}x the "
        f"prompts and return the first {args.problems} complete groups (time to B groups)."
    )
    espo_verdict = _verdict(espo["ratio_to_none"], 0.8, espo["false_stop_rate"])
    best_over = min(r for r in (over_none["ratio_to_none"], over_espo["ratio_to_none"], 9.0) if r is not None)
    print(
        f"target espo/none <= 0.8 at <= 3% false stops: {_f(espo['ratio_to_none'])} at "
        f"{_f(espo['false_stop_rate'])} false stops -> {espo_verdict}"
    )
    print(
        f"target time to B groups / none's full batch <= 0.7: over:none {_f(over_none['ratio_to_none'])}, "
        f"over:espo {_f(over_espo['ratio_to_none'])} -> {_verdict(best_over, 0.7)}"
    )


def _verdict(ratio: float | None, target: float, false_stops: float | None = None) -> str:
    if ratio is None:
        return "not measured"
    ok = ratio <= target and (false_stops is None or false_stops <= 0.03)
    return "met" if ok else "MISSED"


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
