"""A shadow sweep over beta on the toy task: how the demo's beta (DEMO_BETA) is chosen.

Starts the embedded server unless `--url` names one, runs one `none` batch (which sets mu and var),
then the same batch in shadow mode under `espo` at each beta (and `regret_only` at the same stop
count, as the demo matches it), all with the same seeds and the same frozen state. The problems
(test split, seed 20_000) are not the demo's (seed 1000+) nor bench/savings.py's (10_000+): the beta
is tuned on other problems than those it is reported on. Prints per beta: shadow stop rate, failing
trajectories caught, false-stop rate and the share of the oracle's savings.

Choice rule (the demo's): the beta whose espo shadow stop rate is closest to the controller's target
tau = 0.25, i.e. where the paper's beta controller settles during training.

    .venv/bin/python -m bench.beta_sweep --betas 5,7,10,15,20,30
"""

from __future__ import annotations

import dataclasses

from bench import harness
from espo_client import EspoClient
from espo_server.toy.demo import matched_regret_beta
from espo_server.toy.evaluate import evaluate
from espo_server.toy.task import encode, generate

TAU = 0.25


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--betas", default="5,7,10,15,20,30")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=20_000)
    harness.add_common_args(parser, "beta_sweep", url_help="a running embedded server (default: start one)")
    harness.add_toy_args(parser)
    args = parser.parse_args()
    betas = [float(b) for b in args.betas.split(",")]

    models = harness.toy_models(args)
    problems = generate(args.problems, "test", seed=args.seed, spec=models.task)
    prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in problems]
    common = dict(prompts=prompts, n=args.n, max_tokens=args.max_tokens, seed=args.seed)
    rows = []
    with harness.embedded_server(args) as url:
        with EspoClient(base_url=url, timeout=1800) as client:
            fresh = {"mu": 0.0, "var": 1.0, "beta": 1.0, "warm": False, "initialised": False, "batches": 0}
            client.set_state(fresh)
            plain = client.rollouts(**common, stop_rule="none")
            base = evaluate(problems, plain.trajectories)
            oracle = base["oracle_tokens_saved"]
            print(
                f"{len(plain.trajectories)} trajectories, {base['failing_ran_to_end']} failing, "
                f"oracle {oracle}"
            )
            warm = dataclasses.replace(plain.state_after, warm=True)
            for beta in betas:
                client.set_state(dataclasses.replace(warm, beta=beta))
                shadow = client.rollouts(
                    **common, stop_rule="espo", shadow=True, update_state=False, include=["z"]
                )
                e = evaluate(problems, shadow.trajectories)
                min_tokens = int(shadow.rule_params["min_tokens"])
                r_beta = matched_regret_beta(shadow.trajectories, shadow.usage.shadow_stopped, min_tokens)
                client.set_state(dataclasses.replace(warm, beta=r_beta))
                regret = client.rollouts(
                    **common,
                    stop_rule="regret_only",
                    rule_params={"v_const": 1.0},
                    shadow=True,
                    update_state=False,
                )
                r = evaluate(problems, regret.trajectories)
                row = {"beta": beta, "regret_only_beta": r_beta}
                for name, m, saved in (("espo", e, shadow.usage.tokens_saved_shadow),
                                       ("regret_only", r, regret.usage.tokens_saved_shadow)):  # fmt: skip
                    row[name] = {
                        "stop_rate": m["shadow_stop_rate"],
                        "failing_caught": m["failing_stopped"] / max(1, m["failing_ran_to_end"]),
                        "false_stop_rate": m["false_stop_rate"],
                        "oracle_share": saved / max(1, oracle),
                    }
                rows.append(row)
                print(_line(row), flush=True)
    chosen = min(rows, key=lambda row: abs(row["espo"]["stop_rate"] - TAU))
    print(f"closest to tau = {TAU}: beta {chosen['beta']}")
    result = {
        "rows": rows,
        "chosen_beta": chosen["beta"],
        "models": models.report.get("key"),
        "config": vars(args),
    }
    harness.write_result(args.out, result)


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _line(row: dict) -> str:
    e, r = row["espo"], row["regret_only"]
    return (
        f"beta {row['beta']:<5} espo: stop rate {e['stop_rate']:.3f}, "
        f"failing caught {e['failing_caught']:.3f}, "
        f"false stops {_f(e['false_stop_rate'])}, oracle share {e['oracle_share']:.3f} | regret_only at the "
        f"same stops: false stops {_f(r['false_stop_rate'])}, oracle share {r['oracle_share']:.3f}"
    )


if __name__ == "__main__":
    main()
