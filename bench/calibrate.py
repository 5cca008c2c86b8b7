"""Calibrating the reference learner (examples/ppo_toy.py): plain PPO (`none`) from the supervised
start under a grid of learner settings, in this process (`--backend local`: the stop rule's code on
a torch sampler; `none` stops nothing, so this is PPO alone), several runs at once.

Every setting starts from ppo_toy's defaults and changes what it names; each runs for every seed
(the seed picks the toy models, the problems and the sampling). Held-out accuracy at T=1 on
`--eval-problems` test problems (the same ones for every run) before training, every
`--eval-every` iterations and at the end; the table gives the gain over the start.

    .venv/bin/python -m bench.calibrate                        # the grid below, seed 0
    .venv/bin/python -m bench.calibrate --settings 'lr3e-5={"learning_rate": 3e-5}' --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import harness
from bench.harness import ROOT

GRID = {
    "gae lr 1e-5": {"learning_rate": 1e-5},
    "gae lr 3e-5": {"learning_rate": 3e-5},
    "gae lr 3e-5 lambda 1": {"learning_rate": 3e-5, "gae_lambda": 1.0},
    "gae lr 3e-5 4 epochs": {"learning_rate": 3e-5, "epochs": 4},
    "gae lr 1e-4": {"learning_rate": 1e-4},
    "group lr 3e-5": {"advantage": "group", "learning_rate": 3e-5},
    "group lr 1e-4": {"advantage": "group", "learning_rate": 1e-4},
    "group lr 3e-4": {"advantage": "group", "learning_rate": 3e-4},
}


def flags(setting: dict) -> list[str]:
    """ppo_toy flags of a setting: {"learning_rate": 3e-5, "norm_adv": False} -> [...]."""
    out = []
    for name, value in setting.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            continue
        else:
            out += [flag, str(value)]
    return out


def run(job: tuple[str, dict, int, argparse.Namespace]) -> dict:
    name, setting, seed, args = job
    from bench.reproduce import load_ppo_toy

    ppo_toy = load_ppo_toy()
    argv = [
        "--backend", "local", "--stop-rule", "none", "--seed", str(seed), "--toy-seed", str(seed),
        "--iterations", str(args.iterations), "--eval-every", str(args.eval_every),
        "--eval-problems", str(args.eval_problems), "--no-eval-greedy", "--no-save-critic",
        "--threads", "1", "--out", str(args.out / "runs"), *flags(setting),
    ]  # fmt: skip
    started = time.perf_counter()
    records = ppo_toy.main(argv)
    evals = [(r["iteration"], r["heldout_acc_t1"]) for r in records if "heldout_acc_t1" in r]
    return {
        "setting": name,
        "flags": setting,
        "seed": seed,
        "curve": evals,
        "final": evals[-1][1],
        "engine_tokens": records[-1]["cumulative_tokens"],
        "policy_steps": sum(r["policy_steps"] for r in records),
        "approx_kl": statistics.fmean(r["approx_kl"] for r in records),
        "wall_s": time.perf_counter() - started,
    }


def start_accuracy(seed: int, args: argparse.Namespace) -> float:
    import torch
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    from bench.reproduce import load_ppo_toy
    from espo_server.toy.local_rollouts import LocalClient
    from espo_server.toy.train import ensure_toy_models

    torch.set_num_threads(1)
    ppo_toy = load_ppo_toy()
    toy = ensure_toy_models(seed=seed)
    client = LocalClient(
        LlamaForCausalLM.from_pretrained(toy.policy_dir, dtype=torch.float32),
        LlamaForTokenClassification.from_pretrained(toy.critic_dir, dtype=torch.float32),
    )
    heldout = ppo_toy.generate(args.eval_problems, "test", seed=ppo_toy.HELDOUT_SEED, spec=toy.task)
    out = ppo_toy.evaluate_heldout(client, heldout, 96, seed=ppo_toy.HELDOUT_SEED, greedy=False)
    return out["heldout_acc_t1"]


def main(argv: list[str] | None = None) -> dict:
    parser = harness.parser(__doc__)
    parser.add_argument(
        "--settings", action="append", default=[], help='NAME={"flag": value, ...} (default: the grid)'
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibrate")
    args = parser.parse_args(argv)
    grid = dict(GRID)
    if args.settings:
        grid = {s.split("=", 1)[0]: json.loads(s.split("=", 1)[1]) for s in args.settings}
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, setting, seed, args) for name, setting in grid.items() for seed in seeds]
    with ProcessPoolExecutor(args.workers) as pool:
        starts = dict(zip(seeds, pool.map(start_accuracy, seeds, [args] * len(seeds)), strict=True))
        print(f"start (T=1, {args.eval_problems} problems): {starts}", flush=True)
        results = []
        for result in pool.map(run, jobs):
            result["gain"] = result["final"] - starts[result["seed"]]
            results.append(result)
            print(f"{result['setting']} seed {result['seed']}: {result['curve']} gain {result['gain']:+.3f} "
                  f"({result['wall_s']:.0f}s)", flush=True)  # fmt: skip
            (args.out / "calibrate.json").write_text(json.dumps({"start": starts, "runs": results}, indent=1))
    lines = [
        f"| setting | held-out T=1 gain after {args.iterations} iterations (per seed) "
        "| curve (iteration: accuracy) |",
        "|---|---|---|",
    ]
    for name in grid:
        rows = [r for r in results if r["setting"] == name]
        gains = ", ".join(f"{r['gain']:+.3f}" for r in rows)
        curve = "; ".join(" ".join(f"{i}: {a:.3f}" for i, a in r["curve"]) for r in rows)
        lines.append(f"| {name} | {gains} | {curve} |")
    table = "\n".join(lines) + "\n"
    (args.out / "calibrate.md").write_text(table)
    print(table)
    return {"start": starts, "runs": results}


if __name__ == "__main__":
    main()
