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

# bench/beta_sweep.py (a shadow sweep on other problems than the demo's and bench/savings.py's) picks
# the beta whose espo shadow stop rate is closest to the controller's target tau = 0.25, i.e. where
# the beta controller settles: 7 for the seed-0 toy models (stop rate 0.23), the paper's beta0 on the
# cumulative scale of z (measured as 0.7 in the average form, the same rule).
DEMO_BETA = 7.0


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

    def costs(out, wall: float) -> dict:
        # what the engine and the critic computed, whatever was kept; what stopping saved
        u = out.usage
        row = {"wall_s": wall, "engine_tokens": u.engine_tokens, "discarded_tokens": u.discarded_tokens,
               "critic_tokens": u.critic_tokens, "critic_calls": u.critic_calls}  # fmt: skip
        if out.shadow:
            return row | {"tokens_saved": u.tokens_saved_shadow}
        return row | {
            "tokens_saved": u.tokens_saved_estimate,
            "tokens_saved_upper_bound": u.tokens_saved_upper_bound,
            "critic_time_s": u.critic_time_s,
            "trajectory_time_s": u.trajectory_time_s,
        }

    fresh = {"mu": 0.0, "var": 1.0, "beta": args.beta, "warm": False, "initialised": False, "batches": 0}
    client.set_state(fresh)
    plain, wall = timed("none", stop_rule="none")
    rows["none"] = evaluate(problems, plain.trajectories) | costs(plain, wall)

    warm = dataclasses.replace(plain.state_after, warm=True, beta=args.beta)
    client.set_state(warm)
    shadow, wall = timed("espo shadow", stop_rule="espo", shadow=True, update_state=False, include=["z"])
    rows["espo shadow"] = evaluate(problems, shadow.trajectories) | costs(shadow, wall)

    real, wall = timed("espo", stop_rule="espo", update_state=False)
    twins = dict(enumerate(shadow.trajectories))  # same prompt, sample and seed, run to the end
    rows["espo"] = evaluate(problems, real.trajectories, twins) | costs(real, wall)
    # regret_only at espo's shadow stop rate (one trace suffices: z is the same under both rules)
    min_tokens = int(shadow.rule_params["min_tokens"])
    regret_beta = matched_regret_beta(shadow.trajectories, shadow.usage.shadow_stopped, min_tokens)
    client.set_state(dataclasses.replace(warm, beta=regret_beta))
    regret_rule = dict(stop_rule="regret_only", rule_params={"v_const": 1.0}, update_state=False)
    r_shadow, wall = timed("regret_only shadow", shadow=True, **regret_rule)
    rows["regret_only shadow"] = evaluate(problems, r_shadow.trajectories) | costs(r_shadow, wall)
    r_real, wall = timed("regret_only", **regret_rule)
    r_twins = dict(enumerate(r_shadow.trajectories))
    rows["regret_only"] = evaluate(problems, r_real.trajectories, r_twins) | costs(r_real, wall)
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
    """espo and regret_only (at espo's stop rate) side by side: fewer engine tokens than none (kept +
    discarded past stops: what the engine computed), false-stop rate and the share of the oracle's
    savings on the same basis, real runs; plus the shadow runs' exact figures."""
    rows, oracle = result["rows"], result["oracle_tokens_saved"]
    none_tokens = rows["none"]["engine_tokens"]
    out = {}
    for rule in ("espo", "regret_only"):
        real, shadow = rows[rule], rows[f"{rule} shadow"]
        saved = none_tokens - real["engine_tokens"]
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


COLUMNS = ("mode", "traj", "acc", "engine tokens", "kept", "discarded", "critic tokens", "saved",
           "fewer", "stop rate", "false stops", "delay", "wall s")  # fmt: skip


def table(result: dict) -> dict:
    """The table the demo prints, as data (what `--json` writes under "table"): one row per mode in
    COLUMNS order, then the summary lines. Engine tokens are what the engine generated, kept plus
    discarded past stops; `saved` and `fewer` compare them with none's (shadow rows: the exact
    saving had the rule stopped), and the oracle's saving is on the same basis."""
    rows, oracle = result["rows"], result["oracle_tokens_saved"]
    none_engine = rows["none"]["engine_tokens"]
    body = []
    for name, r in rows.items():
        shadow = name.endswith("shadow")
        saved = r["tokens_saved"] if shadow else none_engine - r["engine_tokens"] if name != "none" else None
        fewer = None if saved is None else saved / max(1, r["engine_tokens"] if shadow else none_engine)
        stop_rate = r["shadow_stop_rate"] if shadow else r["stop_rate"] if name != "none" else None
        body.append([
            name, r["n"], r["accuracy"], r["engine_tokens"], r["tokens_generated"], r["discarded_tokens"],
            r["critic_tokens"], saved, fewer, stop_rate, r["false_stop_rate"], r["median_detection_delay"],
            round(r["wall_s"], 1),
        ])  # fmt: skip
    shadow, real, none = rows["espo shadow"], rows["espo"], rows["none"]
    caught = shadow["failing_stopped"] / max(1, shadow["failing_ran_to_end"])
    saved = shadow["tokens_saved"]
    gate = gate_summary(result)
    e, r = gate["espo"], gate["regret_only"]
    verdicts = target_verdicts(e)
    lines = [
        f"shadow: would stop {caught:.1%} of the {shadow['failing_ran_to_end']} failing trajectories.",
        f"shadow: would stop {shadow['shadow_stop_rate']:.1%} of trajectories, saving {saved} engine tokens "
        f"exactly ({saved / max(1, shadow['engine_tokens']):.1%} of those generated, "
        f"{saved / max(1, oracle):.1%} of the oracle's).",
        f"espo:   the engine generated {real['engine_tokens']} tokens ({real['tokens_generated']} kept, "
        f"{real['discarded_tokens']} generated past a stop while the critic answered and thrown away) "
        f"instead of none's {none['engine_tokens']}: {e['fewer_tokens']:.1%} fewer; the critic computed "
        f"{real['critic_tokens']} tokens. {none['failing_ran_to_end']} of {none['n']} trajectories failed "
        "in the none run.",
        f"value gate, at the same stop rate (shadow {e['shadow_stop_rate']:.3f} vs "
        f"{r['shadow_stop_rate']:.3f}; regret_only beta {result['regret_only_beta']:.3f} with v_const 1):",
        f"  false stops  espo {_fmt(e['false_stop_rate'], '.3f')}  "
        f"regret_only {_fmt(r['false_stop_rate'], '.3f')}   (shadow "
        f"{_fmt(e['shadow_false_stop_rate'], '.3f')} vs {_fmt(r['shadow_false_stop_rate'], '.3f')})",
        f"  oracle share espo {e['oracle_share']:.3f}  regret_only {r['oracle_share']:.3f}"
        f"   (shadow {e['shadow_oracle_share']:.3f} vs {r['shadow_oracle_share']:.3f}); failing caught "
        f"(shadow) {e['shadow_failing_caught']:.3f} vs {r['shadow_failing_caught']:.3f}",
        "  targets (espo): "
        + ", ".join(
            f"{name} {e[name]:.3f} {op} {bound} {'met' if verdicts[name] else 'MISSED'}"
            for name, (op, bound) in TARGETS.items()
            if e[name] is not None
        ),
        "engine tokens = kept + discarded (what the engine computed); saved, fewer: none's engine tokens "
        "minus the row's (shadow: exact, had the rule stopped); oracle: every failing trajectory stopped "
        "at its first wrong token; false stops: stops of trajectories that were in fact correct; delay: "
        "median tokens from the first wrong token to the stop.",
    ]
    return {"columns": list(COLUMNS), "rows": body, "oracle_tokens_saved": oracle, "gate": gate,
            "targets": verdicts, "lines": lines}  # fmt: skip


_SPECS = ("<18", ">5", ">6.3f", ">13", ">6", ">9", ">13", ">7", ">6.1%", ">9.3f", ">11.3f", ">6.1f", ">7.1f")


def print_table(table: dict) -> None:
    """Print `table(result)`."""
    width = [s.lstrip("<>").split(".")[0] for s in _SPECS]
    print()
    aligns = ["<"] + [">"] * (len(width) - 1)
    print(" ".join(format(c, a + w) for c, a, w in zip(table["columns"], aligns, width, strict=True)))
    for row in table["rows"]:
        print(" ".join(
            format("-", (s[0] if s[0] in "<>" else ">") + w) if v is None else format(v, s)
            for v, s, w in zip(row, _SPECS, width, strict=True)
        ))  # fmt: skip
    print(f"{'oracle':<18} {table['oracle_tokens_saved']:>{sum(int(w) + 1 for w in width[1:8]) - 1}}   "
          "(saved: every failing trajectory stopped at its first wrong token)")  # fmt: skip
    print()
    for line in table["lines"]:
        print(line)


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
    printed = table(result)
    print_table(printed)
    if args.json:  # the table as printed, and the figures behind it
        args.json.write_text(json.dumps({"table": printed} | result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
