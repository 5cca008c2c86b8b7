"""The GPU run's one table (bench/gpu.sh): what overhead.json, throughput.json and critic_cost.json in
one directory measured, a row per figure.

    .venv/bin/python -m bench.gpu_table DIR

A bench whose JSON is missing is listed as not run and the exit status is 1; a JSON without a field
the table reads is an error (KeyError), not a blank.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import harness

Row = tuple[str, str, str, str]  # bench, setting, measure, value
HEADER: Row = ("bench", "setting", "measure", "value")

OVERHEAD = (  # (measure, key of a row of overhead.json, format)
    ("(a) AsyncLLM, final outputs only, tok/s", "a_asyncllm_tok_s", ",.0f"),
    ("(f) AsyncLLM, per-token deltas + logprobs, tok/s", "f_asyncllm_stream_tok_s", ",.0f"),
    ("(b) vllm serve, tok/s", "b_vllm_serve_tok_s", ",.0f"),
    ("(c) espo-server, rule none, tok/s", "c_espo_none_tok_s", ",.0f"),
    ("(d) espo-server, espo shadow + critic, tok/s", "d_espo_shadow_tok_s", ",.0f"),
    ("c/f: no rule, over the fair floor", "c_over_f", ".3f"),
    ("d/f: espo shadow, over the fair floor", "d_over_f", ".3f"),
    ("d/b: espo shadow, over vllm serve", "d_over_b", ".3f"),
    ("critic queries per sequence (d)", "critic_calls_per_seq_d", ".2f"),
    ("critic tokens per generated token (d)", "critic_tokens_per_gen_d", ".3f"),
    ("mean critic batch (d)", "critic_batch_mean_d", ".1f"),
)
CRITIC_COST = (  # (measure, rule, key of critic_cost.json's rows.after[rule], format)
    ("none: wall s", "none", "wall_s_median", ".2f"),
    ("regret_only: wall / none's", "regret_only", "wall_ratio_to_none", ".3f"),
    ("espo: wall / none's", "espo", "wall_ratio_to_none", ".3f"),
    ("espo: critic queries per call", "espo", "critic_calls_per_run", ",.0f"),
    ("critic tokens per generated token", "espo", "critic_tokens_per_generated", ".3f"),
    ("prefix tokens per generated token", "espo", "prefix_tokens_per_generated", ".3f"),
    ("critic tokens per query", "espo", "critic_tokens_per_query", ".1f"),
    ("mean critic batch", "espo", "mean_batch_size", ".1f"),
    ("floor: distinct prefix tokens per generated", "espo", "floor_tokens_per_generated", ".3f"),
)


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(ledger: dict | None) -> str:
    """The critic's CPU milliseconds per query from a ledger summary (bench.harness.ledger_summary)."""
    per_query = None if ledger is None else ledger["critic_per_query"]
    return _f(None if per_query is None else 1000 * per_query, ".2f")


def overhead_rows(result: dict) -> Iterator[Row]:
    for r in result["rows"]:
        k = f"{r['concurrency']} seqs x {r['tokens_per_run'] // r['concurrency']} tok"
        for measure, key, spec in OVERHEAD:
            yield "overhead", k, measure, _f(r[key], spec)
        yield "overhead", k, "critic CPU ms per query (d)", _ms(r["cpu_seconds_per_run"]["d_espo_shadow"])


def throughput_rows(result: dict) -> Iterator[Row]:
    c, s = result["config"], result["summary"]
    batch = f"{c['problems'] * c['n']} traj x <={c['max_tokens']} tok, {c['engine_max_num_seqs']} slots"
    yield "throughput", batch, "none: wall s", _f(s["none"]["wall_s"], ".2f")
    yield "throughput", batch, "none: tokens", _f(s["none"]["tokens"], ",.0f")
    for mode in ("espo", "random", "over:espo"):
        yield "throughput", batch, f"{mode}: wall / none's", _f(s[mode]["ratio_to_none"], ".3f")
    yield "throughput", batch, "espo: tokens", _f(s["espo"]["tokens"], ",.0f")
    yield "throughput", batch, "espo: stop rate", _f(s["espo"]["stop_rate"], ".3f")
    yield "throughput", batch, "espo: critic queries", _f(s["espo"]["critic_calls"], ",.0f")
    yield "throughput", batch, "espo: critic CPU ms per query", _ms(result["cpu_seconds_per_batch"]["espo"])


def critic_cost_rows(result: dict) -> Iterator[Row]:
    c, rows = result["config"], result["rows"]["after"]
    call = f"{c['problems'] * c['n']} traj x <={c['max_tokens']} tok"
    for measure, rule, key, spec in CRITIC_COST:
        yield "critic cost", call, measure, _f(rows[rule][key], spec)


BENCHES: dict[str, Callable[[dict], Iterator[Row]]] = {
    "overhead.json": overhead_rows,
    "throughput.json": throughput_rows,
    "critic_cost.json": critic_cost_rows,
}


def table(out: Path) -> tuple[list[str], list[str]]:
    """(the table's lines, the JSON files missing)."""
    lines, missing, rows = [], [], []
    models = out / "models.json"
    if models.exists():
        m = json.loads(models.read_text())
        lines.append(
            f"policy: Qwen2 {m['policy_size']} ({m['policy_params'] / 1e9:.2f}B parameters), critic: Qwen2 "
            f"{m['critic_size']} ({m['critic_params'] / 1e9:.2f}B), random weights, {m['dtype']}"
        )
    for name, rows_of in BENCHES.items():
        path = out / name
        if not path.exists():
            missing.append(name)
            continue
        result = json.loads(path.read_text())
        rows.extend(rows_of(result))
        lines.append(f"{name}: {result.get('wall_s', '?')} s; machine: {result.get('machine', '?')}")
    widths = [max(len(row[i]) for row in (HEADER, *rows)) for i in range(len(HEADER))]
    for row in (HEADER, *rows):  # text columns left-aligned, the value right-aligned
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1].rjust(widths[-1])]))
    lines.extend(f"{name}: not run (no JSON)" for name in missing)
    return lines, missing


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("out", type=Path, help="the directory bench/gpu.sh wrote")
    args = parser.parse_args()
    lines, missing = table(args.out)
    print("\n".join(lines))
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
