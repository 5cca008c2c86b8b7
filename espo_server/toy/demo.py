"""`espo-server demo` (what `make run` runs): the embedded server on the toy task, and what stopping saves.

1. Trains the toy models if they are not cached yet (progress on stdout), starts `espo-server serve`
   (embedded default: toy policy, in-process critic) unless `--url` names a running server.
2. Sends one batch of toy test problems five times with the same seeds:
     none                plain sampling; as the first batch it also initialises the ESPO state (mu, var)
     espo shadow         the rule with a warm state, never stopping: where it *would* stop, exactly
     espo                the same rule stopping for real
     regret_only shadow  the rule without the value gate (a constant in place of V(s_t)), its
                         threshold set so that it would stop exactly as many trajectories as espo
                         shadow: what the critic adds, at the same stop rate
     regret_only         the same, stopping for real
   The state is set warm once, and the shadow and real runs do not fold into it
   (`update_state: false`), so all see the same state (mu, var; the regret_only runs their own beta).
3. Prints trajectories, accuracy, tokens generated and saved, stop rate, false-stop rate (stops of
   trajectories that were in fact correct: the shadow run knows; real stops are judged through their
   shadow twin), median detection delay after the first wrong token, and wall time, beside the oracle
   (every failing trajectory stopped at its first wrong token).

Matching regret_only's stop rate: the smoothed regret z_t does not depend on the rule (mu and var
are the same), and regret_only stops at the first t >= min_tokens with z_t > beta * max(v_const,
eps). With v_const = 1 its threshold is beta itself, so it stops trajectory i iff
max_{t >= min_tokens} z_t > beta: beta halfway between the k-th and (k+1)-th largest of those
maxima (from espo shadow's z traces) stops exactly the k trajectories espo shadow stopped.
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
from espo_server.config import default_toy_size
from espo_server.process import ServerProcess, espo_server_argv
from espo_server.toy.evaluate import evaluate, outcome
from espo_server.toy.task import Problem, encode, generate

# The toy policy's regret is small and spiky; the paper's beta0 = 7 (tuned for a 7B model on long
# math) stops nothing here. bench/beta_sweep.py (a shadow sweep on other problems than the demo's and
# bench/savings.py's) picks the beta whose espo shadow stop rate is closest to the controller's target
# tau = 0.25, i.e. where the beta controller settles: 0.7 for the seed-0 toy models (stop rate 0.23).
DEMO_BETA = 0.7


def matched_regret_beta(trajectories, stops: int, min_tokens: int) -> float:
    """The regret_only threshold (beta, with v_const = 1) that stops `stops` of these trajectories,
    from their z traces (see the module docstring)."""
    peaks = sorted((max(t.traces.z[min_tokens:], default=float("-inf")) for t in trajectories), reverse=True)
    if stops <= 0:
        return peaks[0] + 1.0 if peaks else 1.0
    if stops >= len(peaks):
        return peaks[-1] - 1.0
    return (peaks[stops - 1] + peaks[stops]) / 2


def run_batches(client: EspoClient, problems: list[Problem], args: argparse.Namespace) -> dict:
    prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in problems]
    common = dict(prompts=prompts, n=args.n, max_tokens=args.max_tokens, seed=args.seed)
    rows: dict[str, dict] = {}

    def timed(name: str, **extra):
        start = time.perf_counter()
        out = client.rollouts(**common, **extra)
        wall = time.perf_counter() - start
        print(f"  {name:<18} {len(out.trajectories)} trajectories in {wall:.1f}s", flush=True)
        return out, wall

    fresh = {"mu": 0.0, "var": 1.0, "beta": args.beta, "warm": False, "initialised": False, "batches": 0}
    client.set_state(fresh)
    plain, wall = timed("none", stop_rule="none")
    rows["none"] = evaluate(problems, plain.trajectories) | {"wall_s": wall}

    warm = dataclasses.replace(plain.state_after, warm=True, beta=args.beta)
    client.set_state(warm)
    shadow, wall = timed("espo shadow", stop_rule="espo", shadow=True, update_state=False, include=["z"])
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
    # regret_only at espo's shadow stop rate (one trace suffices: z is the same under both rules)
    min_tokens = int(shadow.rule_params["min_tokens"])
    regret_beta = matched_regret_beta(shadow.trajectories, shadow.usage.shadow_stopped, min_tokens)
    client.set_state(dataclasses.replace(warm, beta=regret_beta))
    regret_rule = dict(stop_rule="regret_only", rule_params={"v_const": 1.0}, update_state=False)
    r_shadow, wall = timed("regret_only shadow", shadow=True, **regret_rule)
    rows["regret_only shadow"] = evaluate(problems, r_shadow.trajectories) | {
        "wall_s": wall,
        "tokens_saved": r_shadow.usage.tokens_saved_shadow,
        "critic_calls": r_shadow.usage.critic_calls,
    }
    r_real, wall = timed("regret_only", **regret_rule)
    rows["regret_only"] = evaluate(problems, r_real.trajectories, dict(enumerate(r_shadow.trajectories))) | {
        "wall_s": wall,
        "tokens_saved": r_real.usage.tokens_saved_estimate,
        "critic_time_s": r_real.usage.critic_time_s,
        "trajectory_time_s": r_real.usage.trajectory_time_s,
        "tokens_saved_upper_bound": r_real.usage.tokens_saved_upper_bound,
        "critic_calls": r_real.usage.critic_calls,
        "discarded_tokens": r_real.usage.discarded_tokens,
    }
    client.set_state(warm)

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
        "regret_only_beta": regret_beta,
        "oracle_tokens_saved": rows["none"]["oracle_tokens_saved"],
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# Targets of what the value gate should buy on the toy task: espo stopping for real.
TARGETS = {"fewer_tokens": (">=", 0.25), "false_stop_rate": ("<=", 0.03), "oracle_share": (">=", 0.60)}


def gate_summary(result: dict) -> dict:
    """espo and regret_only (at espo's stop rate) side by side: fewer tokens than none, false-stop
    rate and the share of the oracle's savings, real runs; plus the shadow runs' exact figures."""
    rows, oracle = result["rows"], result["oracle_tokens_saved"]
    none_tokens = rows["none"]["tokens_generated"]
    out = {}
    for rule in ("espo", "regret_only"):
        real, shadow = rows[rule], rows[f"{rule} shadow"]
        saved = none_tokens - real["tokens_generated"]
        out[rule] = {
            "stop_rate": real["stop_rate"],
            "fewer_tokens": saved / max(1, none_tokens),
            "false_stop_rate": real["false_stop_rate"],
            "oracle_share": saved / max(1, oracle),
            "accuracy": real["accuracy"],
            "shadow_stop_rate": shadow["shadow_stop_rate"],
            "shadow_false_stop_rate": shadow["false_stop_rate"],
            "shadow_oracle_share": shadow["tokens_saved"] / max(1, oracle),
            "shadow_failing_caught": shadow["failing_stopped"] / max(1, shadow["failing_ran_to_end"]),
        }
    return out


def target_verdicts(espo: dict) -> dict[str, bool]:
    return {
        name: espo[name] is not None and (espo[name] >= bound if op == ">=" else espo[name] <= bound)
        for name, (op, bound) in TARGETS.items()
    }


def print_table(result: dict) -> None:
    rows = result["rows"]
    print()
    print(
        f"{'mode':<18} {'traj':>5} {'acc':>6} {'tokens':>7} {'saved':>7} {'stop rate':>9} "
        f"{'false stops':>11} {'delay':>6} {'wall s':>7}"
    )
    for name, r in rows.items():
        stop_rate = r["shadow_stop_rate"] if name.endswith("shadow") else r["stop_rate"]
        print(
            f"{name:<18} {r['n']:>5} {_fmt(r['accuracy'], '.3f'):>6} {r['tokens_generated']:>7} "
            f"{_fmt(r.get('tokens_saved'), 'd'):>7} {_fmt(stop_rate if name != 'none' else None, '.3f'):>9} "
            f"{_fmt(r['false_stop_rate'], '.3f'):>11} {_fmt(r['median_detection_delay'], '.1f'):>6} "
            f"{r['wall_s']:>7.1f}"
        )
    none, shadow, real = rows["none"], rows["espo shadow"], rows["espo"]
    oracle = result["oracle_tokens_saved"]
    print(
        f"{'oracle':<18} {'':>20} {oracle:>7}   (every failing trajectory stopped at its first wrong token)"
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
    gate = gate_summary(result)
    e, r = gate["espo"], gate["regret_only"]
    print(
        f"value gate, at the same stop rate (shadow {e['shadow_stop_rate']:.3f} vs "
        f"{r['shadow_stop_rate']:.3f}; regret_only beta {result['regret_only_beta']:.3f} with v_const 1):"
    )
    print(
        f"  false stops  espo {_fmt(e['false_stop_rate'], '.3f')}  "
        f"regret_only {_fmt(r['false_stop_rate'], '.3f')}   (shadow "
        f"{_fmt(e['shadow_false_stop_rate'], '.3f')} vs {_fmt(r['shadow_false_stop_rate'], '.3f')})"
    )
    print(
        f"  oracle share espo {e['oracle_share']:.3f}  regret_only {r['oracle_share']:.3f}"
        f"   (shadow {e['shadow_oracle_share']:.3f} vs {r['shadow_oracle_share']:.3f}); failing caught "
        f"(shadow) {e['shadow_failing_caught']:.3f} vs {r['shadow_failing_caught']:.3f}"
    )
    verdicts = target_verdicts(e)
    print(
        "  targets (espo): "
        + ", ".join(
            f"{name} {e[name]:.3f} {op} {bound} {'met' if verdicts[name] else 'MISSED'}"
            for name, (op, bound) in TARGETS.items()
            if e[name] is not None
        )
    )
    print(
        "saved: shadow = exact; espo = estimate (mean unstopped length minus kept length); "
        "false stops: stops of trajectories that were in fact correct; delay: median tokens from the "
        "first wrong token to the stop."
    )


def demo_cli(args: argparse.Namespace) -> int:
    from espo_server.toy.train import ToyConfig, ensure_toy_models

    if getattr(args, "beta", None) is None:
        args.beta = DEMO_BETA
    size = getattr(args, "toy_size", None) or default_toy_size()
    task = (ToyConfig.quick() if size == "quick" else ToyConfig()).task
    problems = generate(args.problems, "test", seed=args.seed + 1000, spec=task)
    server = None
    url = args.url
    if url is None:
        print(f"toy models ({size}; trained on first use, cached afterwards):", flush=True)
        models = ensure_toy_models(quick=size == "quick")
        print(f"  policy {models.policy_dir}\n  critic {models.critic_dir}", flush=True)
        logs = Path(tempfile.mkdtemp(prefix="espo-demo-"))
        argv = espo_server_argv("serve", "--port", str(args.port), "--toy-size", size)
        server = ServerProcess("espo-server", argv, args.port, logs)
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
