"""What early stopping saves on the toy task: none vs espo, beside the oracle, in one run.

Starts the embedded server (toy policy + in-process critic), then for each repeat (a new seed and
new problems) runs the demo's three batches with the same seeds: `none` (which, as the first batch
after a reset, sets mu and var), `espo` in shadow mode (exactly where it would stop, and whether those
trajectories were in fact correct), and `espo` for real (the same state). Reports, summed or as
medians over repeats:

  wall time to finish the batch, tokens generated, tokens saved, stop rate, false-stop rate (stopped
  trajectories whose shadow twin was correct), critic calls per trajectory, critic time share
  (summed critic latency / summed trajectory generation time, i.e. how much of a trajectory's life
  a query was pending), and the oracle: tokens saved by stopping every failing trajectory at its
  first wrong token, the limit of any stop rule; espo's savings as a fraction of it; median
  detection delay (tokens from the first wrong token to the stop).

    .venv/bin/python bench/savings.py                   # 3 repeats x 64 problems x n=4 (768 trajectories)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from espo_client import EspoClient  # noqa: E402
from espo_server.process import ServerProcess, espo_server_argv, free_port  # noqa: E402
from espo_server.toy.demo import DEMO_BETA, run_batches  # noqa: E402
from espo_server.toy.task import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--beta", type=float, default=DEMO_BETA)
    parser.add_argument("--url", default=None, help="a running embedded server (default: start one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "savings.json"))
    args = parser.parse_args()

    from espo_server.toy.train import ensure_toy_models

    models = ensure_toy_models()
    server = None
    url = args.url
    if url is None:
        port = free_port()
        server = ServerProcess(
            "espo-server",
            espo_server_argv("serve", "--port", str(port)),
            port,
            Path(tempfile.mkdtemp(prefix="espo-bench-")),
        )
        server.start()
        url = server.url
    started = time.time()
    runs = []
    try:
        if server is not None:
            print(f"starting the embedded server (log {server.log_path}) ...", flush=True)
            server.wait_ready()
        with EspoClient(base_url=url, timeout=1800) as client:
            for rep in range(args.repeats):
                problems = generate(args.problems, "test", seed=10_000 + rep)
                batch_args = argparse.Namespace(
                    n=args.n, max_tokens=args.max_tokens, seed=rep * 7919, beta=args.beta
                )
                print(f"repeat {rep + 1}/{args.repeats}", flush=True)
                runs.append(run_batches(client, problems, batch_args))
    finally:
        if server is not None:
            server.stop()

    result = summarise(runs) | {"config": vars(args), "models": models.report.get("key"), "wall_s": 0.0}
    result["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result | {"runs": runs}, indent=2, default=str))
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
    delays = [
        r["rows"]["espo"]["median_detection_delay"]
        for r in runs
        if r["rows"]["espo"]["median_detection_delay"] is not None
    ]
    stops_judged, false_stops = total("espo", "stops_judged"), total("espo", "false_stops")
    sh_judged, sh_false = total("espo shadow", "stops_judged"), total("espo shadow", "false_stops")
    saved_real = total("none", "tokens_generated") - total("espo", "tokens_generated")
    return {
        "trajectories_per_mode": n,
        "failing_trajectories": failing,
        "none": {
            "wall_s_median": med("none", "wall_s"),
            "tokens": total("none", "tokens_generated"),
            "accuracy": total("none", "accuracy") / len(runs),
        },
        "espo": {
            "wall_s_median": med("espo", "wall_s"),
            "tokens": total("espo", "tokens_generated"),
            "accuracy": total("espo", "accuracy") / len(runs),
            "tokens_saved_measured": saved_real,
            "tokens_saved_estimate": total("espo", "tokens_saved"),
            "tokens_saved_upper_bound": total("espo", "tokens_saved_upper_bound"),
            "stop_rate": total("espo", "stop_rate") / len(runs),
            "false_stop_rate": false_stops / stops_judged if stops_judged else None,
            "critic_calls_per_trajectory": total("espo", "critic_calls") / n,
            "critic_time_share": total("espo", "critic_time_s")
            / max(1e-9, total("espo", "trajectory_time_s")),
            "discarded_tokens": total("espo", "discarded_tokens"),
            "median_detection_delay": statistics.median(delays) if delays else None,
        },
        "shadow": {
            "tokens_saved_exact": total("espo shadow", "tokens_saved"),
            "stop_rate": total("espo shadow", "shadow_stop_rate") / len(runs),
            "false_stop_rate": sh_false / sh_judged if sh_judged else None,
            "failing_stopped_share": total("espo shadow", "failing_stopped") / failing if failing else None,
        },
        "oracle_tokens_saved": oracle,
        "espo_fraction_of_oracle": saved_real / oracle if oracle else None,
        "shadow_fraction_of_oracle": total("espo shadow", "tokens_saved") / oracle if oracle else None,
        "wall_ratio_espo_over_none": med("espo", "wall_s") / med("none", "wall_s"),
    }


def print_table(s: dict) -> None:
    e, sh, no = s["espo"], s["shadow"], s["none"]

    def row(label: str, none_value: str, espo_value: str, note: str = "") -> None:
        print(f"{label:<28} {none_value:>10} {espo_value:>10}   {note}".rstrip())

    print(
        f"\nToy task: {s['trajectories_per_mode']} trajectories per mode, {s['failing_trajectories']} failing"
    )
    row("", "none", "espo")
    row(
        "wall time, median (s)",
        f"{no['wall_s_median']:.2f}",
        f"{e['wall_s_median']:.2f}",
        f"ratio {s['wall_ratio_espo_over_none']:.3f}",
    )
    saved = e["tokens_saved_measured"]
    row(
        "tokens generated",
        str(no["tokens"]),
        str(e["tokens"]),
        f"saved {saved} ({saved / max(1, no['tokens']):.1%})",
    )
    row("accuracy (stops = failures)", f"{no['accuracy']:.3f}", f"{e['accuracy']:.3f}")
    row("stop rate", "-", f"{e['stop_rate']:.3f}")
    row("false-stop rate", "-", _f(e["false_stop_rate"]), "stopped, shadow twin correct")
    row(
        "median detection delay",
        "-",
        _f(e["median_detection_delay"], ".1f"),
        "tokens after the first wrong one",
    )
    row("critic calls / trajectory", "-", f"{e['critic_calls_per_trajectory']:.2f}")
    row("critic time share", "-", f"{e['critic_time_share']:.3f}", "query pending / trajectory lifetime")
    row(
        "tokens saved, estimate",
        "-",
        str(e["tokens_saved_estimate"]),
        f"upper bound {e['tokens_saved_upper_bound']}",
    )
    print(
        f"shadow: stop rate {sh['stop_rate']:.3f}, false-stop rate {_f(sh['false_stop_rate'])}, stops "
        f"{_f(sh['failing_stopped_share'])} of the failing, saves {sh['tokens_saved_exact']} tokens exactly"
    )
    print(
        f"oracle: {s['oracle_tokens_saved']} tokens; espo saved {_f(s['espo_fraction_of_oracle'])} of it "
        f"(shadow {_f(s['shadow_fraction_of_oracle'])})"
    )


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
