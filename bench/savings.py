"""What early stopping saves on the toy task: none vs espo vs regret_only, beside the oracle, in one run.

Starts the embedded server (toy policy + in-process critic), then for each repeat (a new seed and
new problems) runs the demo's five batches with the same seeds: `none` (which, as the first batch
after a reset, sets mu and var), `espo` in shadow mode (exactly where it would stop, and whether those
trajectories were in fact correct), `espo` for real (the same state), and `regret_only` (no value
gate) in shadow mode and for real, its threshold set so that its shadow run stops exactly as many
trajectories as espo's: what the critic adds at the same stop rate. Reports, summed or as medians
over repeats:

  wall time to finish the batch, engine tokens (kept + discarded past stops) and critic tokens,
  tokens saved, stop rate, false-stop rate (stopped
  trajectories whose shadow twin was correct), critic calls per trajectory, critic time share
  (summed critic latency / summed trajectory generation time, i.e. how much of a trajectory's life
  a query was pending), and the oracle: tokens saved by stopping every failing trajectory at its
  first wrong token, the limit of any stop rule; espo's savings as a fraction of it; median
  detection delay (tokens from the first wrong token to the stop).

    .venv/bin/python -m bench.savings           # 3 repeats x 64 problems x n=4 (768 trajectories)

Targets for espo stopping for real: >= 25% fewer engine tokens than none, <= 3% false stops, >= 60% of the
oracle's savings; printed as met or missed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import harness
from espo_client import EspoClient
from espo_server.toy.demo import DEMO_BETA, TARGETS, run_batches
from espo_server.toy.task import generate


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--beta", type=float, default=DEMO_BETA)
    harness.add_common_args(parser, "savings", url_help="a running embedded server (default: start one)")
    harness.add_toy_args(parser)
    args = parser.parse_args()

    models = harness.toy_models(args)
    started = time.time()
    runs = []
    with harness.embedded_server(args) as url, EspoClient(base_url=url, timeout=1800) as client:
        for rep in range(args.repeats):
            problems = generate(args.problems, "test", seed=10_000 + rep, spec=models.task)
            batch_args = argparse.Namespace(
                n=args.n, max_tokens=args.max_tokens, seed=rep * 7919, beta=args.beta
            )
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            runs.append(run_batches(client, problems, batch_args))

    result = summarise(runs) | {"config": vars(args), "models": models.report.get("key"), "wall_s": 0.0}
    result["wall_s"] = round(time.time() - started, 1)
    harness.write_result(args.out, result | {"runs": runs})
    print_table(result)
    print(f"wrote {args.out}")


def summarise(runs: list[dict]) -> dict:
    def total(mode: str, key: str) -> float:
        return sum(r["rows"][mode][key] or 0 for r in runs)

    def med(mode: str, key: str) -> float:
        return statistics.median(r["rows"][mode][key] for r in runs)

    n = total("none", "n")
    oracle = sum(r["oracle_tokens_saved"] for r in runs)
    failing = total("none", "failing_ran_to_end")
    out = {
        "trajectories_per_mode": n,
        "failing_trajectories": failing,
        "none": {
            "wall_s_median": med("none", "wall_s"),
            "tokens": total("none", "engine_tokens"),
            "accuracy": total("none", "accuracy") / len(runs),
        },
        "oracle_tokens_saved": oracle,
        "regret_only_beta": [r["regret_only_beta"] for r in runs],
    }
    for rule in ("espo", "regret_only"):
        shadow = f"{rule} shadow"
        delays = [
            r["rows"][rule]["median_detection_delay"]
            for r in runs
            if r["rows"][rule]["median_detection_delay"] is not None
        ]
        stops_judged, false_stops = total(rule, "stops_judged"), total(rule, "false_stops")
        sh_judged, sh_false = total(shadow, "stops_judged"), total(shadow, "false_stops")
        # engine tokens (kept + discarded past stops): what the engine computed
        saved_real = total("none", "engine_tokens") - total(rule, "engine_tokens")
        out[rule] = {
            "wall_s_median": med(rule, "wall_s"),
            "tokens": total(rule, "engine_tokens"),
            "kept_tokens": total(rule, "tokens_generated"),
            "critic_tokens": total(rule, "critic_tokens"),
            "accuracy": total(rule, "accuracy") / len(runs),
            "tokens_saved_measured": saved_real,
            "fewer_tokens": saved_real / max(1, total("none", "engine_tokens")),
            "tokens_saved_estimate": total(rule, "tokens_saved"),
            "tokens_saved_upper_bound": total(rule, "tokens_saved_upper_bound"),
            "stop_rate": total(rule, "stop_rate") / len(runs),
            "false_stop_rate": false_stops / stops_judged if stops_judged else None,
            "critic_calls_per_trajectory": total(rule, "critic_calls") / n,
            "critic_time_share": total(rule, "critic_time_s") / max(1e-9, total(rule, "trajectory_time_s")),
            "discarded_tokens": total(rule, "discarded_tokens"),
            "median_detection_delay": statistics.median(delays) if delays else None,
            "oracle_share": saved_real / oracle if oracle else None,
            "wall_ratio_over_none": med(rule, "wall_s") / med("none", "wall_s"),
        }
        out[f"{rule}_shadow"] = {
            "tokens_saved_exact": total(shadow, "tokens_saved"),
            "stop_rate": total(shadow, "shadow_stop_rate") / len(runs),
            "false_stop_rate": sh_false / sh_judged if sh_judged else None,
            "failing_stopped_share": total(shadow, "failing_stopped") / failing if failing else None,
            "oracle_share": total(shadow, "tokens_saved") / oracle if oracle else None,
        }
    # names kept from before regret_only joined the table
    out["shadow"] = out["espo_shadow"]
    out["espo_fraction_of_oracle"] = out["espo"]["oracle_share"]
    out["shadow_fraction_of_oracle"] = out["espo_shadow"]["oracle_share"]
    out["wall_ratio_espo_over_none"] = out["espo"]["wall_ratio_over_none"]
    e = out["espo"]
    out["targets"] = {
        name: e[name] is not None and (e[name] >= bound if op == ">=" else e[name] <= bound)
        for name, (op, bound) in TARGETS.items()
    }
    return out


def print_table(s: dict) -> None:
    no, e, r = s["none"], s["espo"], s["regret_only"]

    def row(label: str, *values: str, note: str = "") -> None:
        print(f"{label:<28}" + "".join(f" {v:>11}" for v in values) + (f"   {note}" if note else ""))

    print(
        f"\nToy task: {s['trajectories_per_mode']} trajectories per mode, {s['failing_trajectories']} failing"
    )
    row("", "none", "espo", "regret_only")
    row(
        "wall time, median (s)",
        f"{no['wall_s_median']:.2f}",
        f"{e['wall_s_median']:.2f}",
        f"{r['wall_s_median']:.2f}",
        note=f"ratio to none {e['wall_ratio_over_none']:.3f} / {r['wall_ratio_over_none']:.3f}",
    )
    row("engine tokens", str(no["tokens"]), str(e["tokens"]), str(r["tokens"]), note="kept + discarded")
    row("fewer engine tokens than none", "-", f"{e['fewer_tokens']:.1%}", f"{r['fewer_tokens']:.1%}")
    row("critic tokens", "-", str(e["critic_tokens"]), str(r["critic_tokens"]))
    row(
        "accuracy (stops = failures)", f"{no['accuracy']:.3f}", f"{e['accuracy']:.3f}", f"{r['accuracy']:.3f}"
    )
    row("stop rate", "-", f"{e['stop_rate']:.3f}", f"{r['stop_rate']:.3f}")
    row(
        "false-stop rate",
        "-",
        _f(e["false_stop_rate"]),
        _f(r["false_stop_rate"]),
        note="stopped, shadow twin correct",
    )
    row("share of the oracle's saving", "-", _f(e["oracle_share"]), _f(r["oracle_share"]))
    row(
        "median detection delay",
        "-",
        _f(e["median_detection_delay"], ".1f"),
        _f(r["median_detection_delay"], ".1f"),
        note="tokens after the first wrong one",
    )
    row("critic calls / trajectory", "-", f"{e['critic_calls_per_trajectory']:.2f}", "-")
    row("critic time share", "-", f"{e['critic_time_share']:.3f}", "-", note="query pending / lifetime")
    row(
        "tokens saved, estimate",
        "-",
        str(e["tokens_saved_estimate"]),
        str(r["tokens_saved_estimate"]),
        note=f"upper bounds {e['tokens_saved_upper_bound']} / {r['tokens_saved_upper_bound']}",
    )
    for rule in ("espo", "regret_only"):
        sh = s[f"{rule}_shadow"]
        print(
            f"{rule} shadow: stop rate {sh['stop_rate']:.3f}, false-stop rate {_f(sh['false_stop_rate'])}, "
            f"stops {_f(sh['failing_stopped_share'])} of the failing, saves {sh['tokens_saved_exact']} "
            f"tokens exactly ({_f(sh['oracle_share'])} of the oracle's)"
        )
    print(
        f"oracle: {s['oracle_tokens_saved']} tokens (failing trajectories stopped at their first wrong token)"
    )
    betas = ", ".join(f"{b:.3f}" for b in s["regret_only_beta"])
    print(f"regret_only: v_const 1, beta per repeat {betas} (matched to espo shadow's stop count)")
    print(
        "targets (espo, real): "
        + ", ".join(
            f"{name} {_f(e[name])} {op} {bound}: {'met' if s['targets'][name] else 'MISSED'}"
            for name, (op, bound) in TARGETS.items()
        )
    )


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
