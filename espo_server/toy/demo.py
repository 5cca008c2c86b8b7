"""`espo-server demo` (what `make run` runs): the embedded server on the toy task, and what stopping saves.

1. Trains the toy models if they are not cached yet (progress on stdout), starts `espo-server serve`
   (embedded default: toy policy, in-process critic) unless `--url` names a running server.
2. Sends one batch of toy test problems three times with the same seeds:
     none         plain sampling; as the first batch it also initialises the ESPO state (mu, var)
     espo shadow  the rule with a warm state, never stopping: where it *would* stop, exactly
     espo         the same rule stopping for real
   The state is set warm once, and the shadow and real runs do not fold into it
   (`update_state: false`), so both see the same state.
3. Prints trajectories, accuracy, tokens generated and saved, stop rate, false-stop rate (stops of
   trajectories that were in fact correct: the shadow run knows; real stops are judged through their
   shadow twin), median detection delay after the first wrong token, and wall time, beside the oracle
   (every failing trajectory stopped at its first wrong token).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from espo_client import EspoClient
from espo_server.process import ServerProcess, espo_server_argv
from espo_server.toy.evaluate import evaluate, outcome
from espo_server.toy.task import Problem, encode, generate

# The toy policy's regret is small and spiky; the paper's beta0 = 7 (tuned for a 7B model on long
# math) stops nothing here. This beta gives a shadow stop rate near the controller's target tau = 0.25
# on the default toy models (a sweep is in the README), i.e. where the beta controller settles.
DEMO_BETA = 0.7


def run_batches(client: EspoClient, problems: list[Problem], args: argparse.Namespace) -> dict:
    prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in problems]
    common = dict(prompts=prompts, n=args.n, max_tokens=args.max_tokens, seed=args.seed)
    rows: dict[str, dict] = {}

    def timed(name: str, **extra):
        start = time.perf_counter()
        out = client.rollouts(**common, **extra)
        wall = time.perf_counter() - start
        print(f"  {name:<12} {len(out.trajectories)} trajectories in {wall:.1f}s", flush=True)
        return out, wall

    fresh = {"mu": 0.0, "var": 1.0, "beta": args.beta, "warm": False, "initialised": False, "batches": 0}
    client.set_state(fresh)
    plain, wall = timed("none", stop_rule="none")
    rows["none"] = evaluate(problems, plain.trajectories) | {"wall_s": wall}

    warm = dataclasses.replace(plain.state_after, warm=True, beta=args.beta)
    client.set_state(warm)
    shadow, wall = timed("espo shadow", stop_rule="espo", shadow=True, update_state=False)
    rows["espo shadow"] = evaluate(problems, shadow.trajectories) | {
        "wall_s": wall,
        "tokens_saved": shadow.usage.tokens_saved_shadow,
        "critic_calls": shadow.usage.critic_calls,
    }

    real, wall = timed("espo", stop_rule="espo", update_state=False)
    twins = dict(enumerate(shadow.trajectories))  # same prompt, sample and seed, run to the end
    rows["espo"] = evaluate(problems, real.trajectories, twins) | {
        "wall_s": wall,
        "tokens_saved": real.usage.tokens_saved_estimate,
        "critic_time_s": real.usage.critic_time_s,
        "trajectory_time_s": real.usage.trajectory_time_s,
        "tokens_saved_upper_bound": real.usage.tokens_saved_upper_bound,
        "critic_calls": real.usage.critic_calls,
        "discarded_tokens": real.usage.discarded_tokens,
    }
    # The server scores eos trajectories itself (the embedded default's toy verifier): its rewards
    # must agree with the client-side verdicts that `evaluate` computed.
    eos = [t for t in plain.trajectories if t.end_reason == "eos"]
    verdicts = [outcome(problems[t.prompt_index], t).correct for t in eos]
    return {
        "rows": rows,
        "verifier": client.info().verifier,
        "server_rewards": {
            "eos": len(eos),
            "missing": sum(t.reward is None for t in eos),
            "disagreeing": sum(
                t.reward is not None and t.reward != float(c) for t, c in zip(eos, verdicts, strict=True)
            ),
        },
        "state": asdict(warm),
        "oracle_tokens_saved": rows["none"]["oracle_tokens_saved"],
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    rows = result["rows"]
    print()
    print(
        f"{'mode':<12} {'traj':>5} {'acc':>6} {'tokens':>7} {'saved':>7} {'stop rate':>9} "
        f"{'false stops':>11} {'delay':>6} {'wall s':>7}"
    )
    for name, r in rows.items():
        stop_rate = r["shadow_stop_rate"] if name == "espo shadow" else r["stop_rate"]
        print(
            f"{name:<12} {r['n']:>5} {_fmt(r['accuracy'], '.3f'):>6} {r['tokens_generated']:>7} "
            f"{_fmt(r.get('tokens_saved'), 'd'):>7} {_fmt(stop_rate if name != 'none' else None, '.3f'):>9} "
            f"{_fmt(r['false_stop_rate'], '.3f'):>11} {_fmt(r['median_detection_delay'], '.1f'):>6} "
            f"{r['wall_s']:>7.1f}"
        )
    none, shadow, real = rows["none"], rows["espo shadow"], rows["espo"]
    oracle = result["oracle_tokens_saved"]
    print(
        f"{'oracle':<12} {'':>20} {oracle:>7}   (every failing trajectory stopped at its first wrong token)"
    )
    saved, generated = shadow["tokens_saved"], shadow["tokens_generated"]
    caught = shadow["failing_stopped"] / max(1, shadow["failing_ran_to_end"])
    print()
    print(f"shadow: would stop {caught:.1%} of the {shadow['failing_ran_to_end']} failing trajectories.")
    print(
        f"shadow: would stop {shadow['shadow_stop_rate']:.1%} of trajectories, saving {saved} tokens exactly "
        f"({saved / max(1, generated):.1%} of those generated, {saved / max(1, oracle):.1%} of the oracle's)."
    )
    fewer = 1 - real["tokens_generated"] / max(1, none["tokens_generated"])
    print(
        f"espo:   generated {real['tokens_generated']} tokens instead of {none['tokens_generated']} "
        f"({fewer:.1%} fewer); {real['discarded_tokens']} more were generated past a stop while the critic "
        f"answered. {none['failing_ran_to_end']} of {none['n']} trajectories failed in the none run."
    )
    print(
        "saved: shadow = exact; espo = estimate (mean unstopped length minus kept length); "
        "false stops: stops of trajectories that were in fact correct; delay: median tokens from the "
        "first wrong token to the stop."
    )


def demo_cli(args: argparse.Namespace) -> int:
    if getattr(args, "beta", None) is None:
        args.beta = DEMO_BETA
    problems = generate(args.problems, "test", seed=args.seed + 1000)
    server = None
    url = args.url
    if url is None:
        from espo_server.toy.train import ensure_toy_models

        print("toy models (trained on first use, a few minutes on 2 cores; cached afterwards):", flush=True)
        models = ensure_toy_models()
        print(f"  policy {models.policy_dir}\n  critic {models.critic_dir}", flush=True)
        logs = Path(tempfile.mkdtemp(prefix="espo-demo-"))
        server = ServerProcess(
            "espo-server", espo_server_argv("serve", "--port", str(args.port)), args.port, logs
        )
        print(
            f"starting espo-server on port {args.port} (engines take about a minute; log {server.log_path})",
            flush=True,
        )
        server.start()
        url = server.url
    try:
        if server is not None:
            server.wait_ready()
        with EspoClient(base_url=url, timeout=1800) as client:
            print(
                f"server ready at {url}; {len(problems)} problems x n={args.n} = "
                f"{len(problems) * args.n} trajectories per mode",
                flush=True,
            )
            result = run_batches(client, problems, args)
    finally:
        if server is not None:
            server.stop()
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
