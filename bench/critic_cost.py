"""What the critic costs on the toy task: critic tokens per generated token, batch sizes, wall time.

Starts one embedded server (toy policy + in-process critic) per variant, all at once, and runs the
same batches through each, alternating (the order rotates every repeat, `--settle` seconds of quiet
before each run): 1,024 toy trajectories per call by default (256 test problems x n=4, more than
the engine's slots), warm state at beta 0.7 (the demo's), learner-owned so every server sees the
same one, real stopping:

  none         plain sampling (the wall-time reference)
  regret_only  the rule without a critic
  espo         the rule with the critic

Per variant and rule: median wall time and its ratio to none; for espo: critic queries, critic
tokens computed, the summed length of the prefixes asked about (what re-encoding each whole costs),
both per generated token (kept + discarded: every token the policy computed), and the critic's batch
sizes (from the server's espo_critic_batch_size histogram).

Variants: `after` is this tree with its defaults (batched queries, prefix caching); `--variant
NAME="FLAGS"` adds servers with other flags (e.g. `before="--no-critic-prefix-caching
--critic-max-batch 1"`: every query alone, its prefix re-encoded); `--before-src DIR` also runs the
server of another source tree (e.g. `git archive` of an older commit), whose critic tokens are
counted from the values traces as whole prefixes (what that code computed).

    .venv/bin/python -m bench.critic_cost --variant before="--no-critic-prefix-caching --critic-max-batch 1"

`--url URL` measures one running espo-server instead (as `after`, with whatever models it serves:
the toy task's prompts only need a vocabulary that starts with the toy's characters, as the GPU run's
random Qwen2 models do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import statistics
import time

from bench import harness
from espo_client import EspoClient
from espo_server.toy.demo import DEMO_BETA
from espo_server.toy.task import encode, generate

RULES = ("none", "regret_only", "espo")
GPU_BLOCK = 16


def reuse_floor(prefixes: list[list[int]]) -> int:
    """Tokens any exact critic must compute for these queries: the distinct nodes of their prefix
    trie (every token position encoded once, whichever query or sample reaches it first). Walked
    token by token, so long prefixes (the GPU run's) cost their length, not its square."""
    root: dict = {}
    nodes = 0
    for prefix in prefixes:
        node = root
        for token in prefix:
            if token not in node:
                node[token] = {}
                nodes += 1
            node = node[token]
    return nodes


def block_cache(prefixes: list[list[int]], block: int) -> int:
    """Tokens a vLLM-style prefix cache of `block`-token blocks computes for these queries, answered
    in this order: each reuses the full blocks earlier queries stored (never its last token). A trie
    of blocks: a block is reusable when every block before it is."""
    root: dict = {}
    computed = 0
    for prefix in prefixes:
        node, reused = root, 0
        while reused + block <= len(prefix) - 1 and (key := tuple(prefix[reused : reused + block])) in node:
            node, reused = node[key], reused + block
        computed += len(prefix) - reused
        node = root
        for start in range(0, len(prefix) // block * block, block):
            node = node.setdefault(tuple(prefix[start : start + block]), {})
    return computed


def run_once(client: EspoClient, body: dict, rule: str, prompt_lens: list[int], old: bool) -> dict:
    """One call; `old`: a server that reports no critic tokens (they are counted from the traces)."""
    before = harness.scrape(client.base_url).histogram("espo_critic_batch_size")
    started = time.perf_counter()
    out = client.rollouts(**body, stop_rule=rule, include=["values"] if rule == "espo" else [])
    wall = time.perf_counter() - started
    after = harness.scrape(client.base_url).histogram("espo_critic_batch_size")
    usage = out.usage.model_dump()
    # Whole-prefix tokens of the answered queries, from the traces: what a server without prefix reuse
    # computed (and the same as critic_prefix_tokens where the server reports it).
    traced = sum(
        prompt_lens[t.prompt_index] + step
        for t in out.trajectories
        for step, value in enumerate((t.traces.values if t.traces else None) or [])
        if value is not None
    )
    buckets = {le: after[2].get(le, 0) - before[2].get(le, 0) for le in after[2]}
    # The queried prefixes, roughly in the order they were asked (by step), for the floor and for a
    # simulated GPU-sized block cache.
    asked = sorted(
        (step, body["prompts"][t.prompt_index]["token_ids"] + t.token_ids[:step])
        for t in out.trajectories
        for step, value in enumerate((t.traces.values if t.traces else None) or [])
        if value is not None
    )
    prefixes = [prefix for _, prefix in asked]
    return {
        "wall_s": wall,
        "trajectories": len(out.trajectories),
        "generated": usage["generated_tokens"],
        "discarded": usage["discarded_tokens"],
        "stopped": usage["stopped"],
        "critic_calls": usage["critic_calls"],
        "critic_errors": usage["critic_errors"],
        "critic_tokens": traced if old else usage["critic_tokens"],
        "critic_prefix_tokens": traced if old else usage["critic_prefix_tokens"],
        "traced_prefix_tokens": traced,
        "critic_batches": after[0] - before[0],
        "critic_batched_queries": after[1] - before[1],
        "critic_batch_buckets": buckets,
        "floor_tokens": reuse_floor(prefixes),
        "gpu_block_tokens": block_cache(prefixes, GPU_BLOCK),
        "cpu_block_tokens_simulated": block_cache(prefixes, 32),  # checks the simulation against vLLM
    }


def summarise(runs: list[dict]) -> dict:
    def total(key: str) -> float:
        return sum(r[key] for r in runs)

    computed = total("generated") + total("discarded")
    batches = total("critic_batches")
    return {
        "wall_s_median": statistics.median(r["wall_s"] for r in runs),
        "runs": len(runs),
        "generated_per_run": total("generated") / len(runs),
        "stopped_per_run": total("stopped") / len(runs),
        "critic_calls_per_run": total("critic_calls") / len(runs),
        "critic_errors": total("critic_errors"),
        "critic_tokens_per_generated": total("critic_tokens") / computed if computed else 0.0,
        "prefix_tokens_per_generated": total("critic_prefix_tokens") / computed if computed else 0.0,
        "floor_tokens_per_generated": total("floor_tokens") / computed if computed else 0.0,
        "gpu_block_tokens_per_generated": total("gpu_block_tokens") / computed if computed else 0.0,
        "critic_tokens_per_query": total("critic_tokens") / max(1, total("critic_calls")),
        "prefix_tokens_per_query": total("critic_prefix_tokens") / max(1, total("critic_calls")),
        "critic_batches": batches,
        "mean_batch_size": total("critic_batched_queries") / batches if batches else None,
        "batch_buckets": {
            le: sum(r["critic_batch_buckets"].get(le, 0) for r in runs)
            for le in runs[0]["critic_batch_buckets"]
        },
    }


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--beta", type=float, default=DEMO_BETA)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"')
    parser.add_argument("--before-src", default=None, help="also run the server of this source tree")
    harness.add_common_args(
        parser, "critic_cost", url_help="measure this running espo-server (default: start some)"
    )
    harness.add_toy_args(parser)
    args = parser.parse_args()
    if args.url and (args.variant or args.before_src):
        parser.error("--url measures one server: no --variant or --before-src with it")

    # servers of ours need the toy models; one given by --url only the task's problems
    task = harness.toy_task(args) if args.url else harness.toy_models(args).task
    variants: list[tuple[str, str | None, list[str]]] = [("after", None, [])]
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants.append((name, None, shlex.split(flags)))
    if args.before_src:
        variants.append(("before-src", args.before_src, []))
    logs = harness.logs_dir("critic-bench")
    memory = ("--gpu-memory-utilization", "0.1", "--critic-gpu-memory-utilization", "0.1")
    size = ("--toy-size", harness.toy_size(args))  # (another tree may not know the flag: its default)
    servers = {
        name: harness.start_espo(
            name, "serve", *memory, *(size if src is None else ()), *flags, logs=logs, src=src
        )
        for name, src, flags in variants
        if not args.url
    }
    started = time.time()
    results: dict = {"config": vars(args), "variants": {n: f for n, _, f in variants}, "rows": {}}
    try:
        print(f"starting {len(servers)} servers (logs {logs}) ...", flush=True)
        for server in servers.values():
            server.wait_ready()
        urls = {"after": args.url} if args.url else {name: s.url for name, s in servers.items()}
        clients = {name: EspoClient(base_url=url, timeout=1800) for name, url in urls.items()}
        problems = generate(args.problems, "test", seed=10_000, spec=task)
        prompts = [{"token_ids": encode(p.prompt), "answer": p.answer} for p in problems]
        prompt_lens = [len(p["token_ids"]) for p in prompts]
        # The warm state: mu/var from one plain batch, beta where the demo puts it; learner-owned.
        first = next(iter(clients.values()))
        fresh = {"mu": 0.0, "var": 1.0, "beta": args.beta, "warm": False, "initialised": False, "batches": 0}
        init = first.rollouts(prompts=prompts, n=args.n, max_tokens=args.max_tokens, seed=1, state=fresh)
        assert init.state_after is not None
        warm = {**dataclasses.asdict(init.state_after), "warm": True, "beta": args.beta}
        print(f"warm state {warm}", flush=True)
        for client in clients.values():  # warm-up: compile, caches
            for rule in RULES:
                client.rollouts(prompts=prompts[:8], n=2, max_tokens=32, seed=2, stop_rule=rule, state=warm)
        runs: dict[tuple[str, str], list[dict]] = {}
        order = [(name, rule) for name in clients for rule in RULES]
        for rep in range(args.repeats):
            body = dict(prompts=prompts, n=args.n, max_tokens=args.max_tokens, seed=100 + rep, state=warm)
            for name, rule in order[rep % len(order) :] + order[: rep % len(order)]:
                time.sleep(args.settle)
                r = run_once(clients[name], body, rule, prompt_lens, old=name == "before-src")
                runs.setdefault((name, rule), []).append(r)
                print(
                    f"  rep {rep + 1} {name:<12} {rule:<12} {r['wall_s']:6.2f}s "
                    f"generated {r['generated']:6d} "
                    f"critic calls {r['critic_calls']:4d} tokens {r['critic_tokens']:6d} "
                    f"prefix tokens {r['critic_prefix_tokens']:6d}",
                    flush=True,
                )
        for name in clients:
            rows = {rule: summarise(runs[name, rule]) for rule in RULES}
            none_wall = rows["none"]["wall_s_median"]
            for rule in RULES:
                rows[rule]["wall_ratio_to_none"] = rows[rule]["wall_s_median"] / none_wall
            results["rows"][name] = rows
        results["raw"] = {f"{n}/{r}": v for (n, r), v in runs.items()}
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
    results["wall_s"] = round(time.time() - started, 1)
    results["machine"] = harness.machine()
    harness.write_result(args.out, results)
    print_table(results)
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    trajectories = results["config"]["problems"] * results["config"]["n"]
    print(f"\nToy task, {trajectories} trajectories per call, medians of {results['config']['repeats']} runs")
    head = f"{'variant':<12} {'none s':>7} {'regret_only':>12} {'espo':>7} {'queries':>8}"
    head += f" {'critic tok/gen':>15} {'prefix tok/gen':>15} {'tok/query':>10} {'batch':>6}"
    print(head + f" {'floor':>6} {'block16':>8}")
    for name, rows in results["rows"].items():
        e = rows["espo"]
        batch = "-" if e["mean_batch_size"] is None else f"{e['mean_batch_size']:.1f}"
        print(
            f"{name:<12} {rows['none']['wall_s_median']:>7.2f} "
            f"{rows['regret_only']['wall_ratio_to_none']:>12.3f} "
            f"{e['wall_ratio_to_none']:>7.3f} {e['critic_calls_per_run']:>8.0f} "
            f"{e['critic_tokens_per_generated']:>15.3f} {e['prefix_tokens_per_generated']:>15.3f} "
            f"{e['critic_tokens_per_query']:>10.1f} {batch:>6} {e['floor_tokens_per_generated']:>6.3f} "
            f"{e['gpu_block_tokens_per_generated']:>8.3f}"
        )
    print(
        "regret_only, espo: wall time over none's; tok/gen: per token the policy generated (kept + "
        "discarded);\nfloor: distinct prefix tokens of the queries (the least any exact critic computes); "
        f"block{GPU_BLOCK}: a {GPU_BLOCK}-token block cache (GPU default), simulated on the same queries"
    )


if __name__ == "__main__":
    main()
