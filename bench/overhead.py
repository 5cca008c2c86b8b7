"""What watching every token costs: espo-server against plain vLLM, side by side in one run.

The same prompts, seeds, max_tokens (EOS ignored, so every path generates exactly the same number of
tokens) and concurrency through:
  (a) vLLM AsyncLLM directly, in this process, logprobs=1           -- the floor
  (b) stock vLLM OpenAI server, /v1/completions with logprobs=1     -- what a user would run instead
  (c) espo-server, stop_rule none                                    -- our HTTP + rollout loop
  (d) espo-server, stop_rule espo in shadow mode, warm state         -- + the rule and the critic
  (e) optional (--stream-interval K): (d) on a server with --stream-interval K
  (f) vLLM AsyncLLM directly, per-token deltas with logprobs, each token's logprob read
                                                                     -- the fair floor of a per-token rule
(a) returns only final outputs, which no rule that watches every token can match; (f) streams what
such a rule must read, so d/f is the overhead of ours.
For (d) it also reports the critic's cost: queries per sequence, critic tokens computed per generated
token (prefix-cache hits excluded) beside the prefix tokens asked about (what re-encoding each whole
would cost), and the mean critic batch size (queries per critic call, from /metrics).
Runs alternate, the order rotating every repeat (a b c d, b c d a, ...), with `--settle` seconds of
quiet before each, so drift on a shared machine hits all paths alike; each figure is the median of
`--repeats` runs. Prints a table and writes JSON.

    .venv/bin/python -m bench.overhead               # CPU defaults (seeded random tiny models)
    .venv/bin/python -m bench.overhead --concurrency 1 16 64 --repeats 5 --max-tokens 128
    .venv/bin/python -m bench.overhead --policy DIR --critic DIR --dtype bfloat16 --concurrency 256   # GPU

`--espo-url URL` measures (c) and (d) on a running espo-server (on this machine, for the CPU ledger)
started on the same models, instead of starting one. On a GPU the engines start one at a time: vLLM
sizes an engine's KV cache from the card's free memory before and after its profile run, so engines
starting side by side on one card count each other's allocations (or fail its check that none was
freed meanwhile).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench import harness
from espo_server.async_llm import shutdown_engine, start_async_llm
from espo_server.process import (
    ServerProcess,
    cpu_worker_from_env,
    eager_from_env,
    free_port,
    kv_cache_memory_bytes,
    vllm_serve_argv,
)
from espo_server.weights import read_config

# Seeded random-weight models (char vocabulary): `tiny` for CPU, `0.5b` (~0.47B parameters) for a GPU.
RANDOM_MODELS = {
    "tiny": {},
    "0.5b": {
        "hidden_size": 1024,
        "num_layers": 28,
        "num_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 4096,
    },
}

# A warm state under which the rule is busy: the critic is asked often, so (d) pays the full price.
WARM = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}


def prompts_for(k: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(12)] for _ in range(k)]


def sampling(max_tokens: int, seed: int, kind):
    """The sampling of (a) and (f): what every path asks for (logprobs=1, EOS ignored)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0, logprobs=1, seed=seed, ignore_eos=True,
        output_kind=kind, detokenize=False,
    )  # fmt: skip


async def run_asyncllm(llm, prompts, max_tokens: int, seed: int) -> int:
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int, prompt: list[int]) -> int:
        params = sampling(max_tokens, seed + i, RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in llm.generate({"prompt_token_ids": prompt}, params, f"a-{time.monotonic_ns()}-{i}"):
            final = out
        return len(final.outputs[0].token_ids)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def run_asyncllm_stream(llm, prompts, max_tokens: int, seed: int) -> int:
    """(f): every token's delta as the engine makes it, with its sampled logprob read out, as the
    rollout loop reads them (and nothing else)."""
    from vllm.sampling_params import RequestOutputKind

    async def one(i: int, prompt: list[int]) -> int:
        params = sampling(max_tokens, seed + i, RequestOutputKind.DELTA)
        tokens: list[int] = []
        logprobs: list[float] = []
        async for out in llm.generate({"prompt_token_ids": prompt}, params, f"f-{time.monotonic_ns()}-{i}"):
            completion = out.outputs[0]
            for token_id, step in zip(completion.token_ids, completion.logprobs or (), strict=True):
                tokens.append(token_id)
                logprobs.append(step[token_id].logprob)
        return len(tokens)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def run_vllm_openai(client: httpx.AsyncClient, model: str, prompts, max_tokens: int, seed: int) -> int:
    async def one(i: int, prompt: list[int]) -> int:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "logprobs": 1,
            "seed": seed + i,
            "ignore_eos": True,
        }
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def run_espo(
    client: httpx.AsyncClient, prompts, max_tokens: int, seed: int, shadow: bool, name: str = ""
) -> int:
    body = {
        "prompts": [{"token_ids": p} for p in prompts],
        "n": 1,
        "max_tokens": max_tokens,
        "seed": seed,
        "ignore_eos": True,
        "update_state": False,
    }
    if shadow:
        body.update(stop_rule="espo", shadow=True, state=WARM)
    else:
        body.update(stop_rule="none")
    r = await client.post("/v1/rollouts", json=body)
    r.raise_for_status()
    usage = r.json()["usage"]
    bench_usage.setdefault(name, []).append(usage)
    return usage["generated_tokens"]


bench_usage: dict[str, list[dict]] = {}


def check_model_len(model_dir: str, max_model_len: int) -> None:
    """Refuse a --max-model-len above the model's positions before any engine starts (vLLM would
    refuse it in every engine, one traceback each)."""
    positions = (read_config(Path(model_dir)) or {}).get("max_position_embeddings")
    if positions is not None and max_model_len > positions:
        raise SystemExit(
            f"--max-model-len {max_model_len} is above the {positions} positions of {model_dir} "
            f"(config.json max_position_embeddings): pass --max-model-len {positions} or less, and "
            "--max-tokens below it"
        )


async def main_async(args) -> dict:
    policy, critic = args.policy, args.critic
    if policy is None or critic is None:
        # Seeded random tiny models: the cheapest engine step there is, so the largest relative cost
        # of our per-token work (the worst case for us).
        from espo_server.tiny_model import TinyConfig, make_tiny_models

        cfg = RANDOM_MODELS[args.random_model]
        tiny_policy, tiny_critic = make_tiny_models(
            Path(tempfile.mkdtemp(prefix="espo-bench-")), seed=0, cfg=TinyConfig(**cfg)
        )
        policy, critic = policy or str(tiny_policy), critic or str(tiny_critic)
    print(f"policy {policy}\ncritic {critic}", flush=True)
    check_model_len(policy, args.max_model_len)
    logs = Path(args.out).with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)

    vllm_port = free_port()
    dtype = args.dtype

    def espo_server(name: str, *extra: str) -> ServerProcess:
        return harness.start_espo(
            name, "serve", "--model", policy, "--critic-model", critic, "--dtype", dtype,
            "--max-model-len", str(args.max_model_len), "--max-n", "512", "--verifier", "none",
            "--gpu-memory-utilization", str(args.mem),
            "--critic-gpu-memory-utilization", str(args.critic_mem), *extra, logs=logs,
        )  # fmt: skip

    from vllm.platforms import current_platform

    one_by_one = not current_platform.is_cpu()  # see the module's docstring
    espo = None if args.espo_url else espo_server("espo-server")
    if one_by_one and espo is not None:
        espo.wait_ready()
    interval = None
    if args.stream_interval > 1:
        interval = espo_server("espo-interval", "--stream-interval", str(args.stream_interval))
        if one_by_one:
            interval.wait_ready()
    vllm_srv = ServerProcess(
        "vllm-serve",
        vllm_serve_argv(
            policy,
            "--dtype",
            dtype,
            "--port",
            str(vllm_port),
            "--host",
            "127.0.0.1",
            "--max-model-len",
            str(args.max_model_len),
            "--served-model-name",
            "policy",
            "--max-logprobs",
            "20",
            "--gpu-memory-utilization",
            str(args.mem),
            "--no-enable-log-requests",
        ),
        vllm_port,
        logs,
        ready_path="/health",
    ).start()
    if one_by_one:
        vllm_srv.wait_ready()

    from vllm.engine.arg_utils import AsyncEngineArgs

    if espo is not None:
        atexit.register(espo.stop)
    atexit.register(vllm_srv.stop)
    if interval is not None:
        atexit.register(interval.stop)
    llm = start_async_llm(  # its worker laid out as the espo servers' (ESPO_CPU_WORKER)
        AsyncEngineArgs(
            model=policy,
            dtype=dtype,
            max_model_len=args.max_model_len,
            logprobs_mode="raw_logprobs",
            max_logprobs=20,
            enable_prefix_caching=True,
            gpu_memory_utilization=args.mem,
            kv_cache_memory_bytes=kv_cache_memory_bytes(),  # as the servers beside it
            enforce_eager=eager_from_env(),
        ),
        cpu_worker=cpu_worker_from_env(),
    )
    timeout = httpx.Timeout(10, read=1800)
    results: dict = {"config": vars(args) | {"policy": policy, "critic": critic}, "rows": []}
    try:
        print("waiting for the servers ...", flush=True)
        if espo is not None:
            espo.wait_ready()
        else:
            harness.wait_ready(args.espo_url)  # (started beside this process's engines, on CPU)
        vllm_srv.wait_ready()
        if interval is not None:
            interval.wait_ready()
        vocab = llm.model_config.get_vocab_size()
        espo_url = args.espo_url or espo.url
        # the espo server's processes, by role (none when --espo-url is on another machine)
        ledger = harness.CpuLedger(espo.proc.pid) if espo is not None else harness.CpuLedger.of_url(espo_url)
        async with contextlib.AsyncExitStack() as stack:
            espo_client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=espo_url, timeout=timeout)
            )
            vllm_client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=vllm_srv.url, timeout=timeout)
            )
            paths = {
                "a_asyncllm": lambda p, s: run_asyncllm(llm, p, args.max_tokens, s),
                "b_vllm_serve": lambda p, s: run_vllm_openai(vllm_client, "policy", p, args.max_tokens, s),
                "c_espo_none": lambda p, s: run_espo(espo_client, p, args.max_tokens, s, False, "c"),
                "d_espo_shadow": lambda p, s: run_espo(espo_client, p, args.max_tokens, s, True, "d"),
                "f_asyncllm_stream": lambda p, s: run_asyncllm_stream(llm, p, args.max_tokens, s),
            }
            if interval is not None:
                interval_client = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=interval.url, timeout=timeout)
                )
                paths["e_espo_interval"] = lambda p, s: run_espo(
                    interval_client, p, args.max_tokens, s, True, "e"
                )
            for k in args.concurrency:
                prompts = prompts_for(k, vocab, seed=k)
                for fn in paths.values():  # warm-up: compile, caches
                    await fn(prompts[: min(k, 4)], 0)
                rates: dict[str, list[float]] = {name: [] for name in paths}
                ledgers: dict[str, list[dict]] = {"c_espo_none": [], "d_espo_shadow": []}
                bench_usage.clear()
                # only (d) asks the critic there
                batches_before = harness.scrape(espo_url).histogram("espo_critic_batch_size")
                names = list(paths)
                for rep in range(args.repeats):
                    # Rotate the order every repeat, and let the last engine's OpenMP threads stop
                    # spinning before the next path starts: otherwise the path after a switch pays.
                    for name in names[rep % len(names) :] + names[: rep % len(names)]:
                        await asyncio.sleep(args.settle)
                        with contextlib.ExitStack() as measuring:
                            measured = ledger is not None and name in ledgers
                            cpu = measuring.enter_context(ledger.measure()) if measured else {}
                            start = time.perf_counter()
                            tokens = await paths[name](prompts, 1000 * rep)
                            seconds = time.perf_counter() - start
                        if name in ledgers:
                            calls = bench_usage[name[0]][-1]["critic_calls"]  # this run's usage
                            ledgers[name].append({"cpu": cpu, "critic_calls": calls})
                        assert tokens == k * args.max_tokens, (name, tokens)
                        rates[name].append(tokens / seconds)
                    print(
                        f"  k={k} rep {rep + 1}/{args.repeats}: "
                        + "  ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items()),
                        flush=True,
                    )
                med = {name: statistics.median(r) for name, r in rates.items()}
                batches_after = harness.scrape(espo_url).histogram("espo_critic_batch_size")
                d_usage = bench_usage["d"]
                computed = sum(u["generated_tokens"] + u["discarded_tokens"] for u in d_usage)
                batches = batches_after[0] - batches_before[0]
                row = {
                    "concurrency": k,
                    "tokens_per_run": k * args.max_tokens,
                    **{f"{name}_tok_s": round(v, 1) for name, v in med.items()},
                    "c_over_a": round(med["c_espo_none"] / med["a_asyncllm"], 3),
                    "d_over_a": round(med["d_espo_shadow"] / med["a_asyncllm"], 3),
                    "d_over_b": round(med["d_espo_shadow"] / med["b_vllm_serve"], 3),
                    "b_over_a": round(med["b_vllm_serve"] / med["a_asyncllm"], 3),
                    "f_over_a": round(med["f_asyncllm_stream"] / med["a_asyncllm"], 3),
                    "c_over_f": round(med["c_espo_none"] / med["f_asyncllm_stream"], 3),
                    "d_over_f": round(med["d_espo_shadow"] / med["f_asyncllm_stream"], 3),
                    "critic_calls_per_seq_d": round(
                        statistics.mean(u["critic_calls"] for u in d_usage) / k, 2
                    ),
                    "critic_tokens_per_gen_d": round(sum(u["critic_tokens"] for u in d_usage) / computed, 3),
                    "prefix_tokens_per_gen_d": round(
                        sum(u["critic_prefix_tokens"] for u in d_usage) / computed, 3
                    ),
                    "critic_batch_mean_d": round((batches_after[1] - batches_before[1]) / batches, 2)
                    if batches
                    else None,
                    "runs": {name: [round(x, 1) for x in r] for name, r in rates.items()},
                    "cpu_seconds_per_run": {name: harness.ledger_summary(r) for name, r in ledgers.items()},
                }
                if "e_espo_interval" in med:
                    row["e_over_a"] = round(med["e_espo_interval"] / med["a_asyncllm"], 3)
                    row["e_over_d"] = round(med["e_espo_interval"] / med["d_espo_shadow"], 3)
                results["rows"].append(row)
    finally:
        servers = [server for server in (espo, vllm_srv, interval) if server is not None]
        for server in servers:  # they shut down side by side, and beside this process's engine
            server.terminate()
        shutdown_engine(llm)  # once, now: no AsyncLLM.__del__ traceback at exit
        for server in servers:
            server.stop()
    return results


def print_table(results: dict) -> None:
    print("\nGenerated tokens/s (median of alternating runs) and ratios")
    head = f"{'conc':>5} {'(a) AsyncLLM':>13} {'(b) vllm serve':>15} {'(c) espo none':>14}"
    head += f" {'(d) espo shadow':>16} {'c/a':>6} {'d/a':>6} {'d/b':>6} {'critic q/seq':>13}"
    print(head + f" {'critic tok/gen':>15} {'prefix tok/gen':>15} {'batch':>6}")
    for r in results["rows"]:
        batch = "-" if r["critic_batch_mean_d"] is None else f"{r['critic_batch_mean_d']:.1f}"
        print(
            f"{r['concurrency']:>5} {r['a_asyncllm_tok_s']:>13,.0f} {r['b_vllm_serve_tok_s']:>15,.0f} "
            f"{r['c_espo_none_tok_s']:>14,.0f} {r['d_espo_shadow_tok_s']:>16,.0f} {r['c_over_a']:>6.3f} "
            f"{r['d_over_a']:>6.3f} {r['d_over_b']:>6.3f} {r['critic_calls_per_seq_d']:>13.2f} "
            f"{r['critic_tokens_per_gen_d']:>15.3f} {r['prefix_tokens_per_gen_d']:>15.3f} {batch:>6}"
        )
    print("\nAgainst the fair floor, (f) AsyncLLM streaming per-token deltas with logprobs")
    print(f"{'conc':>5} {'(f) stream':>11} {'f/a':>6} {'c/f':>6} {'d/f':>6}")
    for r in results["rows"]:
        print(
            f"{r['concurrency']:>5} {r['f_asyncllm_stream_tok_s']:>11,.0f} {r['f_over_a']:>6.3f} "
            f"{r['c_over_f']:>6.3f} {r['d_over_f']:>6.3f}"
        )
    for r in results["rows"]:
        harness.print_ledger(r["cpu_seconds_per_run"], unit=f"run of {r['concurrency']} sequence(s)")
    if any("e_over_a" in r for r in results["rows"]):
        k = results["config"]["stream_interval"]
        print(f"\n(e) (d) with --stream-interval {k}")
        for r in results["rows"]:
            print(
                f"{r['concurrency']:>5} {r['e_espo_interval_tok_s']:>10,.0f} tok/s  e/a {r['e_over_a']:.3f}  "
                f"e/d {r['e_over_d']:.3f}"
            )
    print(f"machine: {results['machine']}")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each run")
    parser.add_argument(
        "--random-model", choices=sorted(RANDOM_MODELS), default="tiny", help="size of the random models"
    )
    parser.add_argument("--policy", default=None, help="policy dir (default: the seeded random tiny model)")
    parser.add_argument("--critic", default=None, help="critic dir (default: the seeded random tiny critic)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--espo-url", default=None, help="measure (c), (d) on this running espo-server (default: start one)"
    )
    parser.add_argument("--mem", type=float, default=0.1, help="gpu_memory_utilization of each policy engine")
    parser.add_argument("--critic-mem", type=float, default=0.1)
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="also run (e): (d) on a server with this stream_interval",
    )
    parser.add_argument("--out", default=str(harness.RESULTS / "overhead.json"))
    args = parser.parse_args()
    started = time.time()
    results = asyncio.run(main_async(args))
    results["machine"] = harness.machine()
    results["wall_s"] = round(time.time() - started, 1)
    harness.write_result(args.out, results)
    print_table(results)
    print(f"wrote {args.out} ({results['wall_s']}s)")


if __name__ == "__main__":
    main()
