"""The paper's comparison at toy scale: PPO from the same supervised start under each stop rule.

Starts the embedded server (toy policy + in-process critic) unless `--url` names one, then for each
seed and each rule trains with `examples/ppo_toy.py` (imported, run in this process) for the same
number of iterations, from the same supervised policy (each run pushes the starting policy first):

  none         plain PPO
  espo         the full rule (regret gated by the critic's V(s_t))
  random       stops at a uniformly drawn step, at espo's measured stop rate (of the same seed): the
               server's random rule draws the step in [min_tokens, max_tokens), so a draw past a
               trajectory's end stops nothing; its `random_rate` is scaled up by
               (max_tokens - min_tokens) / (mean length - min_tokens), the mean length that of the
               same seed's `none` run, and the table reports the stop rate it really had
  regret_only  the rule with a constant in place of V(s_t)
  value_only   stop when V(s_t) < v_min

Every rule that steers beta starts from `--beta0` (the demo's beta: the paper's 7 stops nothing on
the toy policy) and runs the paper's controller (tau 0.25). The learner owns the ESPO state and sets
it warm after its first iteration. Each iteration prints ppo_toy's progress line; every
`--eval-every` iterations the policy's held-out accuracy (the same 128 test problems for every run,
one sample at T=1 and one greedy) is measured through the server, apart from the rollout tokens.

Writes `--out`/reproduce.json (every run's per-iteration records), `--out`/reproduce.md (the table:
held-out accuracy at T=1 and greedy after the last iteration, cumulative rollout tokens, wall time;
mean, standard deviation and range over seeds) and the plot `--plot` (held-out accuracy against
cumulative rollout tokens, one colour per rule, the mean over seeds bold).

The learner trains its critic (for GAE) alongside the policy and pushes it to the server every
iteration (ppo_toy `--push-critic`, `POST /v1/critic/weights`), so the stop rule judges with the
critic PPO trains; every run first pushes the starting critic, so each starts from the same one.
`--no-push-critic` keeps the server's starting critic for the whole run (the stale-critic ablation).

    make reproduce                                    # 5 rules x 3 seeds x 40 iterations
    .venv/bin/python -m bench.reproduce --rules none,espo --seeds 0 --iterations 3   # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from bench import harness
from bench.harness import ROOT
from espo_client import EspoClient
from espo_client.stop_rule import EspoParams
from espo_server.toy.demo import DEMO_BETA

RULES = ("none", "espo", "random", "regret_only", "value_only")
EXAMPLE = ROOT / "examples" / "ppo_toy.py"


def load_ppo_toy():
    """examples/ppo_toy.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ppo_toy", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated learner seeds")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--problems", type=int, default=16, help="problems per iteration")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--beta0", type=float, default=DEMO_BETA, help="starting beta of every rule")
    parser.add_argument(
        "--random-rate", type=float, default=None, help="random's stop rate (default: espo's measured one)"
    )
    parser.add_argument(
        "--push-critic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="push the learner's critic every iteration (ppo_toy --push-critic; default: on)",
    )
    parser.add_argument("--url", default=None, help="a running embedded server (default: start one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reproduce")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "reproduce.png")
    harness.add_toy_args(parser)
    args = parser.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = sorted(set(args.rules) - set(RULES))
    if unknown:
        parser.error(f"--rules: unknown {unknown}; choose from {list(RULES)}")
    if not args.rules or not args.seeds:
        parser.error("--rules and --seeds need at least one entry each")
    if "random" in args.rules and args.random_rate is None and "espo" not in args.rules:
        parser.error("--rules random needs espo in --rules (its stop rate) or --random-rate")
    # random takes espo's measured stop rate: run espo first
    args.rules.sort(key=lambda r: (r == "random", RULES.index(r)))
    return args


def measured_stop_rate(records: list[dict]) -> float:
    """Mean stop rate over the iterations in which stopping was enabled (state warm)."""
    warm = [r["stop_rate"] for r in records if r["state"]["warm"]]
    return statistics.fmean(warm) if warm else 0.0


def random_rate_for(stop_rate: float, mean_length: float, max_tokens: int, min_tokens: int) -> float:
    """The `random_rate` that stops about `stop_rate` of trajectories of about `mean_length` tokens
    when the stop step is drawn uniformly from [min_tokens, max_tokens)."""
    reach = max(1e-6, (mean_length - min_tokens) / max(1, max_tokens - min_tokens))
    return min(1.0, stop_rate / min(1.0, reach))


def mean_length(run: dict) -> float:
    """Mean tokens per trajectory of a run."""
    return run["cumulative_tokens"] / max(1, len(run["records"]) * run["per_iteration"])


def run_one(ppo_toy, args: argparse.Namespace, url: str, rule: str, seed: int, random_rate: float | None):
    rule_params: dict = {"beta0": args.beta0}
    if rule == "random":
        rule_params["random_rate"] = round(random_rate or 0.0, 4)
    argv = [
        "--url", url, "--stop-rule", rule, "--seed", str(seed), "--iterations", str(args.iterations),
        "--problems", str(args.problems), "--n", str(args.n), "--max-tokens", str(args.max_tokens),
        "--eval-every", str(args.eval_every), "--eval-problems", str(args.eval_problems),
        "--rule-params", json.dumps(rule_params), "--out", str(args.out / "runs"), "--threads", "1",
    ]  # fmt: skip
    if args.push_critic:
        argv.append("--push-critic")
    started = time.perf_counter()
    records = ppo_toy.main(argv)
    wall = time.perf_counter() - started
    last = next((r for r in reversed(records) if "heldout_acc_t1" in r), {})
    return {
        "rule": rule,
        "seed": seed,
        "rule_params": rule_params,
        "wall_s": wall,
        "cumulative_tokens": records[-1]["cumulative_tokens"] if records else 0,
        "heldout_acc_t1": last.get("heldout_acc_t1"),
        "heldout_acc_greedy": last.get("heldout_acc_greedy"),
        "stop_rate": measured_stop_rate(records),
        "per_iteration": args.problems * args.n,
        "records": records,
    }


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


METRICS = ("heldout_acc_t1", "heldout_acc_greedy", "cumulative_tokens", "wall_s", "stop_rate")


def summarise(runs: list[dict], start: dict) -> dict:
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    table = {rule: {m: spread([r[m] for r in runs if r["rule"] == rule]) for m in METRICS} for rule in rules}
    return {"start": start, "table": table}


def _cell(s: dict, spec: str) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{format(s['mean'], spec)} ± {format(s['std'], spec)}"
    return text + (f" [{format(s['min'], spec)}, {format(s['max'], spec)}]" if s["n"] > 1 else "")


def markdown_table(summary: dict, args: argparse.Namespace) -> str:
    start = summary["start"]
    lines = [
        f"PPO on the toy task: {args.iterations} iterations x {args.problems} problems x n={args.n}, "
        f"seeds {','.join(map(str, args.seeds))}; held-out accuracy on {args.eval_problems} test problems "
        f"(start: T=1 {start['heldout_acc_t1']:.3f}, greedy {start['heldout_acc_greedy']:.3f}); "
        "mean ± std [min, max] over seeds",
        "",
        "| rule | held-out acc T=1 | held-out acc greedy | rollout tokens | wall s | stop rate |",
        "|---|---|---|---|---|---|",
    ]
    for rule, t in summary["table"].items():
        lines.append(
            f"| {rule} | {_cell(t['heldout_acc_t1'], '.3f')} | {_cell(t['heldout_acc_greedy'], '.3f')} | "
            f"{_cell(t['cumulative_tokens'], '.0f')} | {_cell(t['wall_s'], '.0f')} | "
            f"{_cell(t['stop_rate'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], start: dict, path: Path) -> None:
    """Held-out accuracy (T=1 left, greedy right) against cumulative rollout tokens, per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    colours = dict(zip(RULES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, key, title in zip(axes, ("heldout_acc_t1", "heldout_acc_greedy"), ("T=1", "greedy"), strict=True):
        for rule in rules:
            curves = []
            for run in (r for r in runs if r["rule"] == rule):
                points = [(0, start[key])] + [
                    (rec["cumulative_tokens"], rec[key]) for rec in run["records"] if key in rec
                ]
                curves.append(points)
                ax.plot(*zip(*points, strict=True), color=colours[rule], alpha=0.25, lw=1)
            length = min(len(c) for c in curves)
            mean = [
                (statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves))
                for i in range(length)
            ]
            ax.plot(*zip(*mean, strict=True), color=colours[rule], lw=2.2, marker="o", ms=3, label=rule)
        ax.set_title(f"held-out accuracy, {title}")
        ax.set_xlabel("cumulative rollout tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.suptitle("PPO on the toy task under each stop rule (thin: seeds, bold: mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    toy = harness.toy_models(args)
    ppo_toy = load_ppo_toy()
    args.out.mkdir(parents=True, exist_ok=True)
    # the learner pushes the supervised start (in the toy cache) and its checkpoints (under --out)
    weights = ["--weights-dir", str(toy.policy_dir.parent), "--weights-dir", str(args.out.resolve())]
    started = time.perf_counter()
    runs: list[dict] = []
    with harness.embedded_server(args, *weights) as url:
        # the supervised start, measured once (every run pushes this same policy first)
        with EspoClient(base_url=url, timeout=1800) as client:
            client.load_weights(str(toy.policy_dir), version=client.info().policy_version + 1)
            heldout = ppo_toy.generate(args.eval_problems, "test", seed=ppo_toy.HELDOUT_SEED, spec=toy.task)
            start = ppo_toy.evaluate_heldout(client, heldout, args.max_tokens, seed=ppo_toy.HELDOUT_SEED)
        print(f"supervised start: held-out T=1 {start['heldout_acc_t1']:.3f}, greedy "
              f"{start['heldout_acc_greedy']:.3f}", flush=True)  # fmt: skip
        total = len(args.rules) * len(args.seeds)
        min_tokens = EspoParams().min_tokens
        for seed in args.seeds:
            rate, length, espo_stop_rate = args.random_rate, None, 0.0  # espo runs before random
            for rule in args.rules:
                print(f"=== run {len(runs) + 1}/{total}: rule {rule}, seed {seed} "
                      f"({time.perf_counter() - started:.0f}s so far)", flush=True)  # fmt: skip
                if rule == "random" and args.random_rate is None:
                    rate = random_rate_for(espo_stop_rate, length, args.max_tokens, min_tokens)
                    print(f"random_rate {rate:.3f} for espo's stop rate {espo_stop_rate:.3f}", flush=True)
                run = run_one(ppo_toy, args, url, rule, seed, rate)
                if rule == "espo":
                    espo_stop_rate = run["stop_rate"]
                if rule == "none" or (rule == "espo" and length is None):
                    length = mean_length(run)  # none's if it ran (espo's are cut short)
                runs.append(run)
                (args.out / "reproduce.json").write_text(json.dumps({"runs": runs}, default=str))

    summary = summarise(runs, start) | {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": toy.report.get("key"),
        "wall_s": time.perf_counter() - started,
    }
    (args.out / "reproduce.json").write_text(json.dumps(summary | {"runs": runs}, indent=1, default=str))
    table = markdown_table(summary, args)
    (args.out / "reproduce.md").write_text(table)
    plot(runs, start, args.plot)
    print()
    print(table)
    print(f"wrote {args.out / 'reproduce.json'}, {args.out / 'reproduce.md'} and {args.plot} "
          f"in {summary['wall_s']:.0f}s")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
