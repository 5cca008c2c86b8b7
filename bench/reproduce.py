"""The paper's comparison at toy scale, with paired seeds: a learner from each seed's supervised start
under each stop rule, and the difference each rule makes against plain PPO on the same seed.

A cell is (learner, learning rate, rule, seed); each runs `examples/ppo_toy.py` for the same
iterations from the seed's own toy policy and critic (`espo-server train-toy --seed S`, cached):

  learners   gae    PPO with GAE from the critic it trains (espo_stop absorbing, length bootstrapped)
             group  the group-relative, critic-free advantage (the outcome minus its prompt group's
                    mean, over the group's std); it trains the critic all the same: the rule asks it
  rules      none         plain PPO
             espo         the full rule (regret, gated by the learner's critic: pushed every iteration)
             regret_only  the rule with a constant in place of V(s_t)
             random       stops at a uniformly drawn step, at espo's measured stop rate of the same
                          learner, learning rate and seed (scaled for trajectories that end first;
                          not in the default grid)
             espo_rfail0  espo with r_fail = 0: a stopped trajectory earns what a failed one does
             value_only   stop when V(s_t) < v_min (not in the default grid)

Every rule that steers beta starts, on each seed, from the beta that stops tau = 0.25 of a shadow
batch of the starting policy (its own beta: espo's with the starting critic, regret_only's without),
and the controller (eta_beta 0.1, tau 0.25) keeps it there: the rules stop about the same share.
The learner owns the state and sets it warm after its first iteration. Held-out accuracy at T=1 on
`--eval-problems` test problems (the same for every cell; one sample each) before training and every
`--eval-every` iterations; engine tokens (kept + thrown away past a stop) and critic tokens per cell.

The backend: `local` (default) samples in this process with the stop rule's own code
(`espo_server.toy.local_rollouts`: the server's trackers and protocol on a torch sampler, the
critic answering `--critic-latency` tokens after it is asked), `--workers` cells at a time;
`server` starts the embedded server (vLLM) for each seed and runs the cells through it one by one.

Writes `--out`/reproduce.json (every cell's per-iteration records) and reproduce.md (the tables),
`--json` (docs/reproduce.json: per seed, rule, learner and learning rate, and the paired
differences) and `--plot` (held-out accuracy against cumulative engine tokens).

    make reproduce
    .venv/bin/python -m bench.reproduce --seeds 0 --rules none,espo --learners gae --lrs 3e-5 --iterations 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import ceiling, harness
from bench.harness import ROOT

RULES = ("none", "espo", "regret_only", "random", "espo_rfail0", "value_only")
# random (the fifth ablation) is left out of the default grid, to bring `make reproduce` near 90 minutes
DEFAULT_RULES = "none,espo,regret_only,espo_rfail0"
RULE_OF = {"espo_rfail0": "espo"}
EXTRA_PARAMS = {"espo_rfail0": {"r_fail": 0.0}}
EXAMPLE = ROOT / "examples" / "ppo_toy.py"
TAU = 0.25
# two-sided 95% quantiles of Student's t (df 1..30); beyond: the normal's
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]  # fmt: skip


def load_ppo_toy():
    """examples/ppo_toy.py as a module (examples/ is not a package)."""
    if "ppo_toy" in sys.modules:
        return sys.modules["ppo_toy"]
    spec = importlib.util.spec_from_file_location("ppo_toy", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--rules", default=DEFAULT_RULES, help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument(
        "--seeds", default="0,1,2,3,4", help="each: its own toy models, problems and sampling"
    )
    parser.add_argument("--learners", default="gae,group", help="gae, group or both")
    parser.add_argument(
        "--lrs", default="1e-5,3e-5", help="the policy learning rates, each run for every learner"
    )
    # 12 iterations, 2 evaluations: 80 cells in 81-118 minutes on 2 cores, by CPU (docs/benchmarks.md)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--problems", type=int, default=32, help="problems per iteration")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--eval-problems", type=int, default=2000)
    parser.add_argument("--eval-greedy", action="store_true", help="evaluate greedy decoding too")
    parser.add_argument("--backend", choices=("local", "server"), default="local")
    parser.add_argument(
        "--url", default=None, help="server backend: a running espo-server (default: start one per seed)"
    )
    parser.add_argument("--workers", type=int, default=2, help="local backend: cells run at once")
    parser.add_argument(
        "--critic-latency", type=int, default=0, help="local backend: tokens per critic answer"
    )
    parser.add_argument("--quick-models", action="store_true", help="the reduced toy models (tests)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the seeds' setups and the cells an earlier run finished (--out, same flags)",
    )  # fmt: skip
    parser.add_argument("--learner-flags", default="", help="more ppo_toy flags for every cell (one string)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reproduce")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "reproduce.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "reproduce.png")
    args = parser.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.learners = [x.strip() for x in args.learners.split(",") if x.strip()]
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    unknown = sorted(set(args.rules) - set(RULES))
    if unknown:
        parser.error(f"--rules: unknown {unknown}; choose from {list(RULES)}")
    if sorted(set(args.learners) - {"gae", "group"}):
        parser.error("--learners: gae and/or group")
    if not args.rules or not args.seeds or not args.learners or not args.lrs:
        parser.error("--rules, --seeds, --learners and --lrs need at least one entry each")
    if "random" in args.rules and "espo" not in args.rules:
        parser.error("--rules random needs espo in --rules (random takes espo's stop rate)")
    args.rules.sort(key=lambda r: (r == "random", RULES.index(r)))  # random after espo
    return args


# --- per seed: the starting models, their accuracy, each rule's starting beta --------------------


def toy_models(seed: int, quick: bool):
    from espo_server.toy.train import ensure_toy_models

    return ensure_toy_models(seed=seed, quick=quick)


def seed_setup(job: tuple[int, argparse.Namespace]) -> dict:
    """The start's held-out accuracy and the beta at which each rule stops tau of a shadow batch."""
    seed, args = job
    import torch
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    from espo_client.stop_rule import EspoParams, EspoState, update_state
    from espo_server.toy.local_rollouts import LocalClient
    from espo_server.toy.task import encode, generate

    torch.set_num_threads(1)
    ppo_toy = load_ppo_toy()
    toy = toy_models(seed, args.quick_models)
    policy = LlamaForCausalLM.from_pretrained(toy.policy_dir, dtype=torch.float32).eval()
    critic = LlamaForTokenClassification.from_pretrained(toy.critic_dir, dtype=torch.float32).eval()
    client = LocalClient(policy, critic)
    heldout = ppo_toy.generate(args.eval_problems, "test", seed=ppo_toy.HELDOUT_SEED, spec=toy.task)
    start = ppo_toy.evaluate_heldout(client, heldout, args.max_tokens, ppo_toy.HELDOUT_SEED, args.eval_greedy)
    # a shadow batch of the training distribution (problems no run trains on), as the first batch
    # of a run would see it: its own statistics set mu and var
    params = EspoParams()
    problems = generate(args.problems * 2, "train", seed=50_000 + seed, spec=toy.task)
    first = client.rollouts([{"token_ids": encode(p.prompt)} for p in problems], n=args.n, seed=seed)
    state = dataclasses.replace(update_state(EspoState.fresh(params), first.batch_stats(), params), warm=True)
    logs = ceiling.log_batch(client, problems, args.n, args.max_tokens, seed=50_000 + seed)
    values = ceiling.critic_values(critic, logs)
    zeros = [[0.0] * (log.length + 1) for log in logs]
    target = round(TAU * len(logs))
    beta0 = {}
    for rule in ("espo", "regret_only"):
        found = ceiling.matched(logs, rule, state, params, values, zeros, 0, target, "beta")
        beta0[rule] = round(found["beta"], 4)
    return {"seed": seed, "start": start, "beta0": beta0, "models": toy.report.get("key")}


def setup_flags(args: argparse.Namespace) -> dict:
    """The flags a seed's setup depends on."""
    names = ("problems", "n", "max_tokens", "eval_problems", "eval_greedy", "quick_models")
    return {name: getattr(args, name) for name in names}


def setup_path(seed: int, args: argparse.Namespace) -> Path:
    return args.out / "setups" / f"seed-{seed}.json"


def kept_setup(seed: int, args: argparse.Namespace) -> dict | None:
    """A seed's setup that an earlier run with the same flags wrote (--resume), else None."""
    path = setup_path(seed, args)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["setup"] if saved["flags"] == setup_flags(args) else None


# --- one cell ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    learner: str
    lr: float
    rule: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.learner}/{self.lr:g}/{self.rule}/{self.seed}"


def cell_argv(cell: Cell, args: argparse.Namespace, setup: dict, url: str | None, random_rate: float | None):
    toy = toy_models(cell.seed, args.quick_models)
    rule = RULE_OF.get(cell.rule, cell.rule)
    params: dict = dict(EXTRA_PARAMS.get(cell.rule, {}))
    if rule in ("espo", "regret_only"):
        params["beta0"] = setup["beta0"][rule]
    if rule == "random":
        params["random_rate"] = round(random_rate or 0.0, 4)
    argv = [
        "--stop-rule", rule, "--advantage", cell.learner, "--learning-rate", str(cell.lr),
        "--seed", str(cell.seed), "--policy", str(toy.policy_dir), "--critic", str(toy.critic_dir),
        "--iterations", str(args.iterations), "--problems", str(args.problems), "--n", str(args.n),
        "--max-tokens", str(args.max_tokens), "--eval-every", str(args.eval_every),
        "--eval-problems", str(args.eval_problems), "--rule-params", json.dumps(params), "--push-critic",
        "--threads", "1", "--out", str(args.out / "runs"),
    ]  # fmt: skip
    argv.append("--eval-greedy" if args.eval_greedy else "--no-eval-greedy")
    if url is None:
        argv += ["--backend", "local", "--critic-latency", str(args.critic_latency), "--no-save-critic"]
    else:
        argv += ["--backend", "server", "--url", url]
    return argv + args.learner_flags.split(), params


def run_cell(cell: Cell, args, setup: dict, url: str | None, random_rate: float | None = None) -> dict:
    ppo_toy = load_ppo_toy()
    argv, params = cell_argv(cell, args, setup, url, random_rate)
    started, cpu = time.perf_counter(), _cpu_s()
    records = ppo_toy.main(argv)
    wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
    evals = [r for r in records if "heldout_acc_t1" in r]
    warm = [r["stop_rate"] for r in records if r["state"]["warm"]]
    return dataclasses.asdict(cell) | {
        "rule_params": params,
        "wall_s": wall,
        "cpu_s": cpu,
        "heldout_acc_t1": evals[-1]["heldout_acc_t1"] if evals else None,
        "heldout_acc_greedy": evals[-1].get("heldout_acc_greedy") if evals else None,
        "curve": [[0, 0, setup["start"]["heldout_acc_t1"]]]
        + [[r["iteration"], r["cumulative_tokens"], r["heldout_acc_t1"]] for r in evals],
        "engine_tokens": records[-1]["cumulative_tokens"],
        "kept_tokens": sum(r["tokens_generated"] for r in records),
        "discarded_tokens": sum(r["tokens_discarded"] for r in records),
        "critic_tokens": records[-1]["cumulative_critic_tokens"],
        "critic_calls": sum(r["critic_calls"] for r in records),
        "stop_rate": statistics.fmean(warm) if warm else 0.0,
        "final_beta": records[-1]["state"]["beta"],
        "mean_length": sum(r["tokens_generated"] for r in records)
        / max(1, len(records) * args.problems * args.n),
        "records": records,
    }


def _cpu_s() -> float:
    """CPU seconds this process has used (user + system): on a busy machine, a better guide than the
    wall clock to what a quiet one would take."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def random_rate_for(stop_rate: float, mean_length: float, max_tokens: int, min_tokens: int) -> float:
    """The `random_rate` that stops about `stop_rate` of trajectories of about `mean_length` tokens
    when the stop step is drawn uniformly from [min_tokens, max_tokens)."""
    reach = max(1e-6, (mean_length - min_tokens) / max(1, max_tokens - min_tokens))
    return min(1.0, stop_rate / min(1.0, reach))


def say(line: str) -> None:
    """One line in one write: the workers share stdout, and print() writes the newline apart."""
    print(line + "\n", end="", flush=True)


def run_chain(job: tuple[list[Cell], argparse.Namespace, dict, str | None]) -> list[dict]:
    """The cells of one (learner, lr, seed) in order: random last, at espo's measured stop rate."""
    cells, args, setup, url = job
    from espo_client.stop_rule import EspoParams

    out: list[dict] = []
    for cell in cells:
        rate = None
        if cell.rule == "random":
            espo = next(r for r in out if r["rule"] == "espo")
            none = next((r for r in out if r["rule"] == "none"), espo)
            rate = random_rate_for(
                espo["stop_rate"], none["mean_length"], args.max_tokens, EspoParams().min_tokens
            )
        saved = args.out / "cells" / (cell.key.replace("/", "_") + ".json")
        argv = cell_argv(cell, args, setup, url, rate)[0]
        kept = json.loads(saved.read_text()) if args.resume and saved.exists() else None
        if kept is not None and kept["argv"] == argv:
            say(f"=== {cell.key}: kept from {saved}")
            out.append(kept["cell"])
            continue
        say(f"=== {cell.key}")
        out.append(run_cell(cell, args, setup, url, rate))
        saved.parent.mkdir(parents=True, exist_ok=True)  # each cell kept as it ends: a crash loses one
        saved.write_text(json.dumps({"argv": argv, "cell": out[-1]}, default=str))
    return out


# --- statistics and output -----------------------------------------------------------------------


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences with a 95% t interval."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def summarise(cells: list[dict], setups: dict[int, dict], args) -> dict:
    groups = []
    for learner in args.learners:
        for lr in args.lrs:
            mine = [c for c in cells if c["learner"] == learner and c["lr"] == lr]
            none = {c["seed"]: c for c in mine if c["rule"] == "none"}
            rows = {}
            for rule in args.rules:
                rs = [c for c in mine if c["rule"] == rule]
                if not rs:
                    continue
                row = {
                    "seeds": [c["seed"] for c in rs],
                    "heldout_acc_t1": [c["heldout_acc_t1"] for c in rs],
                    "gain": [c["heldout_acc_t1"] - setups[c["seed"]]["start"]["heldout_acc_t1"] for c in rs],
                    "engine_tokens": [c["engine_tokens"] for c in rs],
                    "critic_tokens": [c["critic_tokens"] for c in rs],
                    "stop_rate": [c["stop_rate"] for c in rs],
                    "wall_s": [c["wall_s"] for c in rs],
                    "cpu_s": [c["cpu_s"] for c in rs],
                }
                twins = [(c, none[c["seed"]]) for c in rs if c["seed"] in none]
                if rule != "none" and twins:
                    row["acc_minus_none"] = paired(
                        [c["heldout_acc_t1"] - n["heldout_acc_t1"] for c, n in twins]
                    )
                    row["tokens_vs_none"] = paired(
                        [c["engine_tokens"] / n["engine_tokens"] - 1 for c, n in twins]
                    )
                rows[rule] = row
            groups.append({"learner": learner, "lr": lr, "rules": rows})
    return {"groups": groups}


def _mean_range(values: list[float], spec: str) -> str:
    text = format(statistics.fmean(values), spec)
    return text + (f" [{format(min(values), spec)}, {format(max(values), spec)}]" if len(values) > 1 else "")


def _interval(p: dict | None, spec: str) -> str:
    if not p:
        return "-"
    if p["low"] is None:
        return format(p["mean"], "+" + spec)
    return (
        f"{format(p['mean'], '+' + spec)} [{format(p['low'], '+' + spec)}, {format(p['high'], '+' + spec)}]"
    )


def markdown(summary: dict, setups: dict[int, dict], args) -> str:
    starts = [s["start"]["heldout_acc_t1"] for s in setups.values()]
    lines = [
        f"{args.iterations} iterations x {args.problems} problems x n={args.n}, seeds "
        f"{','.join(map(str, args.seeds))} (each its own starting models); held-out accuracy at T=1 on "
        f"{args.eval_problems} test problems (start {_mean_range(starts, '.3f')}); values: mean [min, max] "
        "over seeds; differences against none: mean of the paired differences [95% t interval]",
        "",
    ]
    for group in summary["groups"]:
        lines += [
            f"**{group['learner']}, learning rate {group['lr']:g}**",
            "",
            "| rule | held-out acc T=1 | gain over start | minus none | engine tokens | vs none "
            "| critic tokens | stop rate | wall s | CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rule, row in group["rules"].items():
            cells = [
                _mean_range(row["heldout_acc_t1"], ".3f"),
                _mean_range(row["gain"], "+.3f"),
                _interval(row.get("acc_minus_none"), ".3f"),
                _mean_range(row["engine_tokens"], ".0f"),
                _interval(row.get("tokens_vs_none"), ".1%"),
                _mean_range(row["critic_tokens"], ".0f"),
                _mean_range(row["stop_rate"], ".3f"),
                _mean_range(row["wall_s"], ".0f"),
                _mean_range(row["cpu_s"], ".0f"),
            ]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(cells: list[dict], summary: dict, args, path: Path) -> None:
    """Held-out accuracy at T=1 against cumulative engine tokens: one panel per learner and learning
    rate, one colour per rule; thin lines seeds, bold the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    cols = len(args.lrs)
    rows = len(args.learners)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False, sharey=True)
    colours = dict(zip(RULES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for group in groups:
        ax = axes[args.learners.index(group["learner"])][args.lrs.index(group["lr"])]
        for rule in group["rules"]:
            curves = [
                c["curve"]
                for c in cells
                if (c["learner"], c["lr"], c["rule"]) == (group["learner"], group["lr"], rule)
            ]
            for curve in curves:
                ax.plot([p[1] for p in curve], [p[2] for p in curve], color=colours[rule], alpha=0.2, lw=0.8)
            length = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][1] for c in curves) for i in range(length)]
            ys = [statistics.fmean(c[i][2] for c in curves) for i in range(length)]
            ax.plot(xs, ys, color=colours[rule], lw=2.2, marker="o", ms=3, label=rule)
        ax.set_title(f"{group['learner']}, lr {group['lr']:g}")
        ax.set_xlabel("cumulative engine tokens (kept + discarded)")
        ax.grid(alpha=0.3)
    for r in range(rows):
        axes[r][0].set_ylabel("held-out accuracy, T=1")
    axes[0][0].legend()
    seeds = f"{len(args.seeds)} seeds; thin: seeds, bold: mean"
    fig.suptitle(f"Toy task: held-out accuracy under each stop rule\n({seeds})")  # one panel is narrow
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------


def chains_of(args) -> list[list[Cell]]:
    # learning rate outermost: a run cut short has both learners at the first rate
    chains = [
        [Cell(learner, lr, rule, seed) for rule in args.rules]
        for lr in args.lrs
        for learner in args.learners
        for seed in args.seeds
    ]
    return chains


def run_local(args, setups: dict[int, dict]) -> list[dict]:
    jobs = [(chain, args, setups[chain[0].seed], None) for chain in chains_of(args)]
    cells: list[dict] = []
    if args.workers <= 1:
        for job in jobs:
            cells += run_chain(job)
        return cells
    with ProcessPoolExecutor(args.workers) as pool:
        for out in pool.map(run_chain, jobs):
            cells += out
            say(f"done: {len(cells)} cells")
    return cells


def run_server(args, setups: dict[int, dict]) -> list[dict]:
    """The cells through an espo-server: `--url`, or one started per seed on that seed's models.
    Every cell pushes its seed's starting policy and critic first, so any server of the toy's
    vocabulary serves any seed (`--url` must accept pushes from the toy cache and from `--out`)."""
    cells: list[dict] = []
    for seed in args.seeds:
        chains = [c for c in chains_of(args) if c[0].seed == seed]
        if args.url is not None:
            for chain in chains:
                cells += run_chain((chain, args, setups[seed], args.url))
            continue
        toy = toy_models(seed, args.quick_models)
        weights = ["--weights-dir", str(toy.policy_dir.parent), "--weights-dir", str(args.out.resolve())]
        models = [
            "--model", str(toy.policy_dir), "--critic-model", str(toy.critic_dir), "--dtype", "float32",
            "--verifier", "toy",
        ]  # fmt: skip
        name = f"reproduce-seed{seed}"
        server = harness.start_espo(name, "serve", *models, *weights, logs=harness.logs_dir(name))
        print(f"seed {seed}: starting the server (log {server.log_path}) ...", flush=True)
        try:
            server.wait_ready()
            for chain in chains:
                cells += run_chain((chain, args, setups[seed], server.url))
        finally:
            server.stop()
    return cells


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = harness.machine()
    print(f"machine: {machine}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # train (or find) every seed's models first
        toy_models(seed, args.quick_models)
    setups = {seed: kept_setup(seed, args) for seed in args.seeds} if args.resume else {}
    jobs = [(seed, args) for seed in args.seeds if setups.get(seed) is None]
    if args.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            setups |= {s["seed"]: s for s in pool.map(seed_setup, jobs)}
    else:
        setups |= {s["seed"]: s for s in map(seed_setup, jobs)}
    for seed, setup in setups.items():  # kept for --resume, with the flags that decide it
        path = setup_path(seed, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"flags": setup_flags(args), "setup": setup}))
    for s in setups.values():
        print(
            f"seed {s['seed']}: start T=1 {s['start']['heldout_acc_t1']:.3f}, beta0 {s['beta0']}", flush=True
        )
    cells = run_local(args, setups) if args.backend == "local" else run_server(args, setups)
    summary = summarise(cells, setups, args)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    wall = time.perf_counter() - started
    head = {"config": config, "machine": machine, "setups": setups}
    raw = {**head, "cells": cells, "wall_s": wall}
    (args.out / "reproduce.json").write_text(json.dumps(raw, default=str))
    compact = [{k: v for k, v in c.items() if k != "records"} for c in cells]
    spent = {  # what the cells took when they ran (a --resume run keeps them: its own wall is short)
        "cells_wall_s": sum(c["wall_s"] for c in cells),
        "cells_cpu_s": sum(c["cpu_s"] for c in cells),
    }
    doc = {**head, "summary": summary, "cells": compact, "wall_s": wall, **spent}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    table = markdown(summary, setups, args)
    (args.out / "reproduce.md").write_text(table)
    plot(cells, summary, args, args.plot)
    print(table)
    print(
        f"wrote {args.out / 'reproduce.json'}, {args.out / 'reproduce.md'}, {args.json} and {args.plot} "
        f"in {wall:.0f}s; the cells took {spent['cells_cpu_s']:.0f} CPU-s "
        f"({spent['cells_wall_s']:.0f} s of workers)"
    )
    return doc


if __name__ == "__main__":
    main()
