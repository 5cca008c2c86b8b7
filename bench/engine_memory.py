"""The critic engine's resident memory under many critic queries, fast: what grows, and whether it stops.

Starts `espo-server critic` on the soak's tiny critic (`make_tiny_models`, seed 0, float32; the
environment of every server the benches start, process.ENGINE_ENV: a 256 MiB KV cache, trimming
every 60 s) and sends it batches of prefixes over POST /v1/values from `--concurrency` clients, as
fast as it answers: each prefix a random length (`--lengths random`: 1 to the model's 512; or one
fixed length) of one of `--trajectories` random token sequences that share a few prompts, a share
of which (`--fresh`) is replaced by new sequences after each batch, as new rollouts replace old ones.
A batch holds 1 to `--max-batch` prefixes (or exactly `--max-batch` with `--fixed-batch`).

Every `--sample-s` seconds it reads the engine process (the critic server's VLLM::EngineCore; its
worker runs inline in it) from /proc: VmRSS, and from smaps the resident KiB of `[heap]`, of other
anonymous mappings, and of file-backed ones, with the number of mappings. Printed as a table (RSS
over queries), and the growth after the warm-up (`--warmup-queries`): the whole, and over the last
half of the run.

Variants to compare (each one run of this script): `--env NAME=VALUE` (repeatable) is set for the
critic server and so for its engine (ONEDNN_PRIMITIVE_CACHE_CAPACITY, MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_, ...); `--critic-flag=--enforce-eager` passes a flag to `espo-server critic`.
The engines run with oneDNN's primitive cache off (process.ENGINE_ONEDNN_CACHE); oneDNN's default,
which grew the heap by ~280 MiB here, is `--env ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024`.

    .venv/bin/python -m bench.engine_memory --seconds 300
    .venv/bin/python -m bench.engine_memory --seconds 300 --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024
    .venv/bin/python -m bench.engine_memory --seconds 300 --lengths 200 --fixed-batch --max-batch 8
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench import harness

MAX_LEN = 512
"""The tiny critic's max_position_embeddings: the longest prefix it takes."""


# ---------------------------------------------------------------------------------------- memory


def smaps_kib(pid: int) -> dict[str, int]:
    """The engine process's memory in KiB from /proc: `rss` (VmRSS), `heap` (the `[heap]` mapping's
    Rss), `anon` (the Rss of the other anonymous mappings: mmap'ed malloc chunks, thread stacks, the KV
    cache), `file` (file-backed mappings' Rss), and `maps` (how many mappings)."""
    out = {"rss": 0, "heap": 0, "anon": 0, "file": 0, "maps": 0}
    status = Path(f"/proc/{pid}/status").read_text()
    out["rss"] = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            out["maps"] += 1
            name = first[5] if len(first) > 5 else ""
            kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        elif first[0] == "Rss:":
            out[kind] += int(first[1])
    return out


def engine_core(server_pid: int, timeout: float = 60.0) -> psutil.Process:
    """The critic server's VLLM::EngineCore process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cores = harness.engine_cores(psutil.Process(server_pid))
        if cores:
            return cores[0]
        time.sleep(0.5)
    raise RuntimeError(f"no VLLM::EngineCore under pid {server_pid}")


# ---------------------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """Prefixes of random trajectories (a few prompts, random continuations), some replaced per batch."""

    rng: random.Random
    lengths: str
    trajectories: int
    fresh: float
    max_batch: int
    fixed_batch: bool
    vocab: int = 53
    prompts: list[list[int]] = field(default_factory=list)
    pool: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompts = [self._tokens(self.rng.randint(8, 40)) for _ in range(8)]
        self.pool = [self._new() for _ in range(self.trajectories)]

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def _new(self) -> list[int]:
        prompt = self.rng.choice(self.prompts)
        return prompt + self._tokens(MAX_LEN - len(prompt))

    def batch(self) -> list[list[int]]:
        size = self.max_batch if self.fixed_batch else self.rng.randint(1, self.max_batch)
        out = []
        for _ in range(size):
            length = self.rng.randint(1, MAX_LEN) if self.lengths == "random" else int(self.lengths)
            out.append(self.rng.choice(self.pool)[:length])
        for _ in range(int(self.fresh * len(self.pool) * size / self.max_batch + self.rng.random())):
            self.pool[self.rng.randrange(len(self.pool))] = self._new()
        return out


# ---------------------------------------------------------------------------------------- the run


@dataclass
class Counts:
    batches: int = 0
    queries: int = 0
    tokens: int = 0
    computed: int = 0


async def hammer(
    url: str, queries: Queries, counts: Counts, stop_at: float, limit: int, concurrency: int
) -> None:
    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while time.monotonic() < stop_at and (not limit or counts.queries < limit):
                batch = queries.batch()
                r = await http.post("/v1/values", json={"token_ids": batch})
                r.raise_for_status()
                counts.batches += 1
                counts.queries += len(batch)
                counts.tokens += sum(map(len, batch))
                counts.computed += sum(r.json()["computed_tokens"])

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def sampler(pid: int, counts: Counts, every: float, rows: list[dict], done: asyncio.Event) -> None:
    started = time.monotonic()
    while True:
        row = {"t": round(time.monotonic() - started), "queries": counts.queries, **smaps_kib(pid)}
        rows.append(row)
        print(_line(row), flush=True)
        try:
            await asyncio.wait_for(done.wait(), every)
            rows.append({"t": round(time.monotonic() - started), "queries": counts.queries, **smaps_kib(pid)})
            return
        except TimeoutError:
            pass


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


HEADER = "| t (s) | queries | RSS MiB | [heap] | other anon | file | maps |\n|---|---|---|---|---|---|---|"


def _line(row: dict) -> str:
    cells = [str(row["t"]), f"{row['queries']:,}", *(_mib(row[k]) for k in ("rss", "heap", "anon", "file"))]
    return "| " + " | ".join([*cells, str(row["maps"])]) + " |"


def growth(rows: list[dict], warmup_queries: int) -> dict[str, dict[str, float]]:
    """Per measure (MiB): at the end of the warm-up (the first sample after `warmup_queries`), at the
    end, the growth between, and the growth over the last half of the queries after the warm-up."""
    warm = next((r for r in rows if r["queries"] >= warmup_queries), rows[-1])
    end = rows[-1]
    mid_q = (warm["queries"] + end["queries"]) / 2
    mid = next(r for r in rows if r["queries"] >= mid_q)
    return {
        k: {
            "warmup_end": round(warm[k] / 1024, 1),
            "end": round(end[k] / 1024, 1),
            "growth": round((end[k] - warm[k]) / 1024, 1),
            "growth_last_half": round((end[k] - mid[k]) / 1024, 1),
        }
        for k in ("rss", "heap", "anon", "file")
    }


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__)
    harness.add_common_args(p, "engine_memory", url_help="unused: this bench always starts its own critic")
    p.add_argument("--seconds", type=float, default=300.0, help="how long to send queries")
    p.add_argument("--queries", type=int, default=0, help="stop after this many queries (0: --seconds only)")
    p.add_argument("--warmup-queries", type=int, default=2000, help="growth is counted from here")
    p.add_argument("--lengths", default="random", help="'random' (1..512) or one prefix length")
    p.add_argument(
        "--max-batch", type=int, default=64, help="most prefixes per call (the server's critic_max_batch)"
    )
    p.add_argument("--fixed-batch", action="store_true", help="every call exactly --max-batch prefixes")
    p.add_argument("--trajectories", type=int, default=256, help="random token sequences queried")
    p.add_argument("--fresh", type=float, default=0.05, help="share of them replaced per full batch")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--sample-s", type=float, default=15.0, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the critic and its engine"
    )
    p.add_argument("--critic-flag", action="append", default=[], help="an extra flag of `espo-server critic`")
    args = p.parse_args(argv)

    from espo_server.tiny_model import make_tiny_models

    work = harness.logs_dir("engine-memory")
    _, critic_model = make_tiny_models(work / "models", seed=0)
    extra = dict(e.split("=", 1) for e in args.env)
    os.environ.update(extra)
    server = harness.start_critic("critic", str(critic_model), *args.critic_flag, logs=work)
    rows: list[dict] = []
    counts = Counts()
    try:
        print(
            f"starting espo-server critic {' '.join(args.critic_flag)} env {extra} "
            f"(log {server.log_path}) ..."
        )
        server.wait_ready()
        assert server.proc is not None
        core = engine_core(server.proc.pid)
        queries = Queries(
            random.Random(args.seed),
            args.lengths,
            args.trajectories,
            args.fresh,
            args.max_batch,
            args.fixed_batch,
        )
        print(HEADER)

        async def run() -> None:
            done = asyncio.Event()
            watch = asyncio.create_task(sampler(core.pid, counts, args.sample_s, rows, done))
            try:
                stop_at = time.monotonic() + args.seconds
                await hammer(server.url, queries, counts, stop_at, args.queries, args.concurrency)
            finally:
                done.set()
                await watch

        asyncio.run(run())
    finally:
        server.stop()
    print(_line(rows[-1]))
    summary = growth(rows, args.warmup_queries)
    print(
        f"\n{counts.queries:,} queries in {counts.batches:,} calls, {counts.tokens:,} prefix tokens, "
        f"{counts.computed:,} computed ({counts.computed / max(counts.tokens, 1):.2f})"
    )
    for k, v in summary.items():
        print(
            f"{k:>5}: {v['warmup_end']:,.0f} MiB after {args.warmup_queries:,} queries, "
            f"{v['end']:,.0f} at the end: {v['growth']:+.0f}, over the last half {v['growth_last_half']:+.0f}"
        )
    result = {"args": vars(args), "counts": vars(counts), "rows": rows, "growth": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
