"""The ceiling of a value gate on the toy task: what a better critic could buy the ESPO rule.

For each seed's toy policy: sample a logged batch (test-split problems, run to the end, regret of
every token), then replay the stop rule offline over it, token by token with the trackers of
`espo_client.stop_rule` (the server's code), with V(s_t) taken from

  oracle       the true success probability of each prefix (below);
  noisy AUC a  the oracle with noise in logit space, its scale set so that the AUC after the first
               mistake (the toy critic's figure) is a = 0.7, 0.8, 0.9; the noise is correlated
               along a trajectory (AR(1), the lag-1 correlation of the toy critic's own errors), as a
               critic's errors are;
  toy critic   the trained toy critic (`espo-server train-toy`);
  --critic     any other critic directory (NAME=PATH), e.g. one from bench/critic_mc.py;

and against `regret_only` (no critic) and `value_only` (the oracle alone). Every rule is replayed at
the same stop rates (its beta, or value_only's v_min, found by bisection to stop that many of the
logged trajectories) and with the same critic schedule (a query at most every `critic_stride` tokens,
answered `--latencies` tokens later; tokens generated meanwhile and thrown away by the stop count as
engine tokens). For each: false stops (stopped trajectories that were correct), the success
probability thrown away (the oracle's V just after the last kept token, summed), failing
trajectories caught, engine tokens saved against running everything to the end, and that saving
as a share of the oracle stopper's (every failing trajectory cut right after its first wrong token).

The oracle, exactly enough: a prefix that still follows the canonical solution succeeds if the
policy samples the rest of it (the product of the canonical tokens' probabilities, one forward pass
per problem), or if it deviates and still ends with the right answer (rare); a prefix past its first
wrong token succeeds only by such a recovery. The recovery rate r is measured by sampling
continuations of logged dirty prefixes, and V* = P_canonical + (1 - P_canonical) r on clean prefixes,
r on dirty ones; a sample of clean prefixes is checked against sampled continuations too.

    .venv/bin/python -m bench.ceiling                  # seeds 0,1,2; writes bench/results/ceiling.json
    .venv/bin/python -m bench.ceiling --seeds 0 --problems 64 --rates 0.25   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench import harness
from bench.harness import ROOT
from espo_client.stop_rule import EspoParams, EspoState, make_tracker, update_state
from espo_server.tiny_model import EOS_ID
from espo_server.toy.local_rollouts import LocalClient, sample_continuations
from espo_server.toy.task import decode, encode, generate, verify
from espo_server.toy.train import Sample, value_quality

LOG_SEED = 30_000  # the logged problems (test split): neither the demo's nor the benches'


@dataclasses.dataclass
class Logged:
    """One logged trajectory, run to its end."""

    prompt: list[int]
    tokens: list[int]
    g: list[float]
    correct: bool
    first_wrong: int | None
    problem: int  # index into the problems

    @property
    def length(self) -> int:
        return len(self.tokens)

    def clean_at(self, t: int) -> bool:
        """Whether s_t (prompt + tokens[:t]) still follows the canonical solution."""
        return self.first_wrong is None or self.first_wrong >= t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--seeds", default="0,1,2", help="toy model seeds (each its own policy and critic)")
    parser.add_argument("--problems", type=int, default=256, help="logged problems per seed")
    parser.add_argument("--n", type=int, default=4, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rates", default="0.1,0.2", help="stop rates every rule is matched at")
    parser.add_argument(
        "--aucs", default="0.7,0.8,0.9", help="AUCs after the first mistake of the noisy oracles"
    )
    parser.add_argument(
        "--latencies",
        default="0,3",
        help="tokens generated while the critic answers (3: the server's median here)",
    )
    parser.add_argument("--recovery-prefixes", type=int, default=300, help="dirty prefixes sampled for r")
    parser.add_argument("--check-prefixes", type=int, default=100, help="clean prefixes checked by sampling")
    parser.add_argument("--continuations", type=int, default=32, help="continuations per checked prefix")
    parser.add_argument("--critic", action="append", default=[], help="NAME=PATH: another critic to replay")
    parser.add_argument(
        "--rule-params", default="{}", help="JSON overrides of the rule, e.g. '{\"eps\": 0.05}'"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick-models", action="store_true", help="the reduced toy models (tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ceiling.json")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.latencies = [int(x) for x in args.latencies.split(",") if x.strip()]
    args.aucs = [float(a) for a in args.aucs.split(",") if a.strip()]
    args.critic = dict(c.split("=", 1) for c in args.critic)
    args.rule_params = json.loads(args.rule_params)
    return args


# --- the logged batch and its oracle ---------------------------------------------------------


def log_batch(client: LocalClient, problems, n: int, max_tokens: int, seed: int) -> list[Logged]:
    prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in problems]
    response = client.rollouts(
        prompts, n=n, max_tokens=max_tokens, seed=seed, stop_rule="none", include=["regret"]
    )
    out = []
    for t in response.trajectories:
        p = problems[t.prompt_index]
        text, finished = decode(t.token_ids)
        v = verify(p.prompt, text, p.answer, finished=finished)
        correct = t.end_reason == "eos" and v.correct
        out.append(
            Logged(
                encode(p.prompt), t.token_ids, t.traces.regret, correct, v.first_wrong_index, t.prompt_index
            )
        )
    return out


@torch.no_grad()
def canonical_success(policy, problems) -> list[np.ndarray]:
    """P(the policy samples the rest of the canonical solution, EOS included | its first t tokens),
    t = 0..len: one forward pass per problem."""
    out = []
    for p in problems:
        prompt, solution = encode(p.prompt), [*encode(p.solution), EOS_ID]
        logits = policy(torch.tensor([prompt + solution])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        token_lp = np.array([logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(solution)])
        suffix = np.concatenate([np.cumsum(token_lp[::-1])[::-1], [0.0]])
        out.append(np.exp(suffix))
    return out


def success_rate(policy, prefixes, budgets, problems_of, problems, k: int, gen) -> np.ndarray:
    """Share of k sampled continuations of each prefix that end with the right answer."""
    rep_prefixes = [p for p in prefixes for _ in range(k)]
    rep_budgets = [b for b in budgets for _ in range(k)]
    conts = sample_continuations(policy, rep_prefixes, rep_budgets, gen)
    wins = []
    for i, cont in enumerate(conts):
        j = i // k
        prob = problems[problems_of[j]]
        prompt_len = len(encode(prob.prompt))
        text, finished = decode(prefixes[j][prompt_len:] + cont)
        wins.append(finished and verify(prob.prompt, text, prob.answer, finished=True).correct)
    return np.array(wins, dtype=float).reshape(len(prefixes), k).mean(1)


def oracle(policy, logs: list[Logged], problems, args, gen) -> tuple[list[np.ndarray], dict]:
    """V*(s_t), t = 0..L, of every logged trajectory, and how it was checked."""
    canon = canonical_success(policy, problems)
    rng = np.random.default_rng(0)
    dirty = [(i, t) for i, log in enumerate(logs) for t in range(log.length) if not log.clean_at(t)]
    pick = (
        rng.choice(len(dirty), size=min(args.recovery_prefixes, len(dirty)), replace=False) if dirty else []
    )
    recovery = [dirty[j] for j in pick]

    def sampled_success(prefixes: list[tuple[int, int]], k: int) -> np.ndarray:
        # (log, t): the log's prompt and first t tokens, continued k times within max_tokens
        return success_rate(
            policy,
            [logs[i].prompt + logs[i].tokens[:t] for i, t in prefixes],
            [args.max_tokens - t for _, t in prefixes],
            [logs[i].problem for i, _ in prefixes],
            problems,
            k,
            gen,
        )

    r = float(sampled_success(recovery, args.continuations // 2).mean()) if recovery else 0.0
    values = []
    for log in logs:
        c = canon[log.problem]
        v = [c[t] + (1 - c[t]) * r if log.clean_at(t) and t < len(c) else r for t in range(log.length + 1)]
        values.append(np.array(v))
    # check clean prefixes against sampled continuations
    clean = [(i, t) for i, log in enumerate(logs) for t in range(log.length) if log.clean_at(t)]
    pick = rng.choice(len(clean), size=min(args.check_prefixes, len(clean)), replace=False)
    chosen = [clean[j] for j in pick]
    sampled = sampled_success(chosen, args.continuations)
    exact = np.array([values[i][t] for i, t in chosen])
    se = np.sqrt(np.clip(exact * (1 - exact), 1e-4, None) / args.continuations)
    check = {
        "recovery_rate": r,
        "recovery_prefixes": len(recovery),
        "checked_clean_prefixes": len(chosen),
        "continuations": args.continuations,
        "mean_abs_error": float(np.mean(np.abs(sampled - exact))),
        "mean_z": float(np.mean((sampled - exact) / se)),
        "within_2se": float(np.mean(np.abs(sampled - exact) <= 2 * se + 1e-9)),
    }
    return values, check


# --- critics ------------------------------------------------------------------------------------


@torch.no_grad()
def critic_values(critic, logs: list[Logged]) -> list[np.ndarray]:
    """A critic's V(s_t), t = 0..L, of every logged trajectory."""
    out = []
    for log in logs:
        v = critic(torch.tensor([log.prompt + log.tokens])).logits[0, :, 0].float().numpy()
        out.append(v[len(log.prompt) - 1 :])
    return out


def samples_of(logs: list[Logged]) -> list[Sample]:
    return [Sample(log.prompt, log.tokens, float(log.correct), log.first_wrong) for log in logs]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def lag1_correlation(residuals: list[np.ndarray]) -> float:
    a = np.concatenate([r[:-1] for r in residuals if len(r) > 1])
    b = np.concatenate([r[1:] for r in residuals if len(r) > 1])
    return float(np.corrcoef(a, b)[0, 1])


def noisy(values: list[np.ndarray], sigma: float, rho: float, seed: int) -> list[np.ndarray]:
    """sigmoid(logit(V*) + sigma * e_t), e an AR(1) of unit variance and lag-1 correlation rho."""
    rng = np.random.default_rng(seed)
    out = []
    for v in values:
        e = np.empty(len(v))
        e[0] = rng.standard_normal()
        for t in range(1, len(v)):
            e[t] = rho * e[t - 1] + math.sqrt(1 - rho**2) * rng.standard_normal()
        out.append(1 / (1 + np.exp(-(logit(v) + sigma * e))))
    return out


def auc_after_mistake(values: list[np.ndarray], logs: list[Logged]) -> float:
    return value_quality(values, samples_of(logs))["auc_after_mistake"] or float("nan")


def noise_for_auc(values, logs, target: float, rho: float, seed: int) -> tuple[float, list[np.ndarray]]:
    lo, hi = 0.0, 20.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if auc_after_mistake(noisy(values, mid, rho, seed), logs) > target:
            lo = mid
        else:
            hi = mid
    sigma = (lo + hi) / 2
    return sigma, noisy(values, sigma, rho, seed)


# --- the replay ---------------------------------------------------------------------------------


def replay(logs, rule, state, params, values, oracle_v, latency: int) -> dict:
    """Run `rule` over every logged trajectory; V(s_t) from `values` (None: the rule asks none)."""
    stops = false = caught = engine = kept_total = calls = critic_tokens = 0
    lost = 0.0
    for i, log in enumerate(logs):
        tracker = make_tracker(rule, state, params)
        stop = pending = None
        generated = log.length
        cached = 0
        for t, g in enumerate(log.g):
            decision = tracker.step(-g, 0.0)
            if decision.stop:
                stop, generated = t, t + 1
                break
            if decision.query_value:
                pending = t
                calls += 1
                prefix = len(log.prompt) + t
                critic_tokens += max(0, prefix - cached)
                cached = max(cached, prefix)
            if pending is not None and t - pending >= latency:
                asked, pending = pending, None
                if tracker.resolve(asked, float(values[i][asked])):
                    stop, generated = asked, t + 1
                    break
        if stop is None and pending is not None and tracker.resolve(pending, float(values[i][pending])):
            stop = pending
        kept = log.length if stop is None else stop + 1
        engine += generated if stop is not None else log.length
        kept_total += kept
        if stop is not None:
            stops += 1
            false += log.correct
            caught += not log.correct
            lost += float(oracle_v[i][stop + 1])
    n = len(logs)
    full = sum(log.length for log in logs)
    failing = sum(not log.correct for log in logs)
    oracle_saved = sum(
        log.length - (log.first_wrong + 1) for log in logs if not log.correct and log.first_wrong is not None
    )
    return {
        "stops": stops,
        "stop_rate": stops / n,
        "false_stops": false,
        "false_stop_rate": false / stops if stops else 0.0,
        "lost_successes": lost,
        "failing_caught": caught / failing if failing else 0.0,
        "engine_tokens": engine,
        "discarded_tokens": engine - kept_total,
        "engine_saved": 1 - engine / full,
        "oracle_share": (full - engine) / oracle_saved if oracle_saved else 0.0,
        "critic_calls": calls,
        "critic_tokens": critic_tokens,
    }


def matched(logs, rule, state, params, values, oracle_v, latency, target: int, knob: str) -> dict:
    """The replay whose stop count is closest to `target`, over `knob` (beta, or value_only's v_min)."""
    best = None
    lo, hi = (-7.0, 7.0) if knob == "beta" else (-0.5, 1.5)
    for _ in range(40):
        mid = (lo + hi) / 2
        if knob == "beta":
            s, p = dataclasses.replace(state, beta=math.exp(mid)), params
        else:
            s, p = state, dataclasses.replace(params, v_min=mid)
        result = replay(logs, rule, s, p, values, oracle_v, latency)
        result[knob] = math.exp(mid) if knob == "beta" else mid
        if best is None or abs(result["stops"] - target) < abs(best["stops"] - target):
            best = result
        more = result["stops"] < target
        if knob == "beta":  # a larger beta stops less
            hi, lo = (mid, lo) if more else (hi, mid)
        else:  # a larger v_min stops more
            lo, hi = (mid, hi) if more else (lo, mid)
        if result["stops"] == target:
            break
    return best


# --- one seed -----------------------------------------------------------------------------------


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    from espo_server.toy.train import ensure_toy_models

    started = time.perf_counter()
    toy = ensure_toy_models(seed=seed, quick=args.quick_models)
    policy = LlamaForCausalLM.from_pretrained(toy.policy_dir, dtype=torch.float32).eval()
    critic = LlamaForTokenClassification.from_pretrained(toy.critic_dir, dtype=torch.float32).eval()
    client = LocalClient(policy, critic)
    params = EspoParams().with_overrides(args.rule_params)
    # a first batch sets mu and var (other problems), then the logged batch
    warmup = generate(64, "test", seed=LOG_SEED + 1, spec=toy.task)
    first = client.rollouts(
        [{"token_ids": encode(p.prompt)} for p in warmup], n=args.n, max_tokens=args.max_tokens, seed=seed
    )
    state = dataclasses.replace(update_state(EspoState.fresh(params), first.batch_stats(), params), warm=True)
    problems = generate(args.problems, "test", seed=LOG_SEED, spec=toy.task)
    logs = log_batch(client, problems, args.n, args.max_tokens, seed=LOG_SEED + seed)
    gen = torch.Generator().manual_seed(seed)
    oracle_v, check = oracle(policy, logs, problems, args, gen)
    toy_v = critic_values(critic, logs)
    residuals = [logit(np.clip(c, 0, 1)) - logit(o) for c, o in zip(toy_v, oracle_v, strict=True)]
    rho = max(0.0, min(0.99, lag1_correlation(residuals)))
    critics: dict[str, list[np.ndarray]] = {"oracle": oracle_v, "toy critic": toy_v}
    sigmas = {}
    for a in args.aucs:
        sigmas[a], critics[f"noisy AUC {a}"] = noise_for_auc(oracle_v, logs, a, rho, seed)
    for name, path in args.critic.items():
        other = LlamaForTokenClassification.from_pretrained(path, dtype=torch.float32).eval()
        critics[name] = critic_values(other, logs)
    quality = {name: value_quality(v, samples_of(logs)) for name, v in critics.items()}

    n = len(logs)

    def row(rule: str, critic: str | None, rate: float, latency: int, knob: str = "beta") -> dict:
        values = critics[critic] if critic else None
        target = round(rate * len(logs))
        result = matched(logs, rule, state, params, values, oracle_v, latency, target, knob)
        return {"rule": rule, "critic": critic, "rate": rate, "latency": latency} | result

    rows = []
    for latency in args.latencies:
        for rate in args.rates:
            rows.append(row("regret_only", None, rate, latency))
            rows.extend(row("espo", name, rate, latency) for name in critics)
            rows.append(row("value_only", "toy critic", rate, latency, "v_min"))
        # The oracle alone is a step function (V* = r past every first mistake): value_only stops every
        # failing trajectory at its first query past the mistake as soon as v_min > r, and nothing
        # below. It is shown at that operating point, whatever its stop rate.
        natural = dataclasses.replace(params, v_min=check["recovery_rate"] + 1e-6)
        at_r = replay(logs, "value_only", state, natural, critics["oracle"], oracle_v, latency)
        rows.append(
            {
                "rule": "value_only",
                "critic": "oracle",
                "rate": None,
                "latency": latency,
                "v_min": natural.v_min,
            }
            | at_r
        )
    first_wrong = [log for log in logs if not log.correct and log.first_wrong is not None]
    return {
        "seed": seed,
        "models": toy.report.get("key"),
        "logged": n,
        "success_rate": sum(log.correct for log in logs) / n,
        "mean_length": statistics.fmean(log.length for log in logs),
        "oracle_saved_share": sum(log.length - (log.first_wrong + 1) for log in first_wrong)
        / sum(log.length for log in logs),
        "state": dataclasses.asdict(state),
        "oracle_check": check,
        "toy_critic_error_lag1_correlation": rho,
        "noise_sigma": {str(a): s for a, s in sigmas.items()},
        "quality": {
            name: {
                k: q.get(k) for k in ("auc_after_mistake", "mse_ratio", "drop_after_mistake", "auc_at_0.50")
            }
            for name, q in quality.items()
        },
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def table(results: list[dict], args: argparse.Namespace) -> str:
    """Mean over seeds [min, max] of each rule and critic at each matched stop rate."""
    seeds = ",".join(str(r["seed"]) for r in results)
    lines = [
        f"Value-gate ceiling on the toy task: seeds {seeds}, {results[0]['logged']} logged trajectories each "
        f"({args.problems} test problems x {args.n})"
        + (f", rule parameters {json.dumps(args.rule_params)}" if args.rule_params else "")
        + "; mean over seeds [min, max]; latency: tokens a sample generates while its critic query is "
        "answered; engine tokens saved: against running every trajectory to its end",
        "",
        "| latency | stop rate | rule | critic (AUC after mistake) | false stops / stops | "
        "success probability thrown away | failing caught | engine tokens saved | share of oracle's saving "
        "| critic calls |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["latency"], r["rate"], r["rule"], r["critic"]) for r in results[0]["rows"]))
    keys.sort(key=lambda k: (k[0], k[1] is None, k[1] or 0.0))  # the unmatched oracle value_only last

    def cell(values: list[float], spec: str) -> str:
        text = format(statistics.fmean(values), spec)
        return text + (
            f" [{format(min(values), spec)}, {format(max(values), spec)}]" if len(values) > 1 else ""
        )

    for latency, rate, rule, critic in keys:
        rows = [
            next(
                x
                for x in r["rows"]
                if (x["latency"], x["rate"], x["rule"], x["critic"]) == (latency, rate, rule, critic)
            )
            for r in results
        ]
        aucs = [r["quality"][critic]["auc_after_mistake"] for r in results] if critic else []
        name = (
            f"{critic} ({statistics.fmean(aucs):.2f})"
            if critic and all(a is not None for a in aucs)
            else (critic or "-")
        )
        lines.append(
            f"| {latency} | {cell([x['stop_rate'] for x in rows], '.3f')} | {rule} | {name} "
            f"| {cell([x['false_stop_rate'] for x in rows], '.3f')} "
            f"| {cell([x['lost_successes'] for x in rows], '.1f')} "
            f"| {cell([x['failing_caught'] for x in rows], '.3f')} "
            f"| {cell([x['engine_saved'] for x in rows], '.3f')} "
            f"| {cell([x['oracle_share'] for x in rows], '.3f')} "
            f"| {cell([x['critic_calls'] for x in rows], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        results.append(run_seed(seed, args))
        r, check = results[-1], results[-1]["oracle_check"]
        print(
            f"seed {seed}: success {r['success_rate']:.3f}, recovery rate {check['recovery_rate']:.4f}, "
            f"oracle check |error| {check['mean_abs_error']:.3f} (mean z {check['mean_z']:+.2f}), "
            f"critic errors' lag-1 correlation {r['toy_critic_error_lag1_correlation']:.2f}, "
            f"{r['wall_s']:.0f}s",
            flush=True,
        )
    text = table(results, args)
    summary = {
        "config": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "seeds": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return summary


if __name__ == "__main__":
    main()
