"""bench/gpu.sh --smoke: the GPU run's whole pipeline at the tests' size, so it still works on the day a
GPU is lent. Random-weight Qwen2 models made from configs, one espo-server on them, bench/overhead.py
(which also runs an AsyncLLM in its own process and a stock vllm serve), bench/throughput.py and
bench/critic_cost.py against that server, and the one table. Every JSON has what the table reads,
and nothing of ours printed a traceback: not the script, not the benches, not the espo-server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_table
from espo_server.process import ENGINE_ENV
from tests.test_clean_exit import tracebacks

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "bench" / "gpu.sh"


def test_the_gpu_models_have_the_shapes_of_qwen2_5_0_5b_and_1_5b() -> None:
    """Built on the meta device (no memory, no time): the parameter counts of the real models, the
    critic a one-label token classifier."""
    import torch

    from bench.gpu_models import QWEN_VOCAB, make_model

    with torch.device("meta"):
        policy = {s: make_model(s, critic=False, seed=0, dtype="bfloat16")[0] for s in ("0.5b", "1.5b")}
        critic, _ = make_model("0.5b", critic=True, seed=1, dtype="bfloat16")
    params = {size: sum(p.numel() for p in model.parameters()) for size, model in policy.items()}
    assert 0.48e9 < params["0.5b"] < 0.51e9 and 1.52e9 < params["1.5b"] < 1.56e9, params
    config = policy["1.5b"].config
    assert type(policy["1.5b"]).__name__ == "Qwen2ForCausalLM" and config.vocab_size == QWEN_VOCAB
    assert config.num_key_value_heads == 2 and config.tie_word_embeddings
    assert type(critic).__name__ == "Qwen2ForTokenClassification" and critic.config.num_labels == 1
    assert next(critic.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would start the GPU run")
def test_without_a_gpu_the_gpu_run_says_so_and_fails(tmp_path) -> None:
    proc = subprocess.run(
        ["bash", str(GPU_SH), "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 2 and "no GPU here" in proc.stderr and "--smoke" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_the_overhead_bench_refuses_a_model_len_its_model_cannot_take(tmp_path) -> None:
    out = tmp_path / "o.json"
    argv = [sys.executable, "-m", "bench.overhead", "--max-model-len", "1024", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "--max-model-len 1024 is above the 512 positions" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_the_gpu_script_runs_its_whole_pipeline_at_smoke_size(tmp_path) -> None:
    out = tmp_path / "gpu"
    # its 8-minute budget is the GPU run's; here a loaded machine may take longer (no test on speed)
    env = {**os.environ, **ENGINE_ENV, "PYTHON": sys.executable, "GPU_BENCH_SECONDS": "1500"}
    proc = subprocess.run(
        ["bash", str(GPU_SH), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode != 0:  # each step's own log, whose tail says why (the script's output interleaves)
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(out.glob("logs/*.log")))
        pytest.fail(f"gpu.sh exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}{logs}")

    results = {name: json.loads((out / name).read_text()) for name in gpu_table.BENCHES}
    for name, rows_of in gpu_table.BENCHES.items():  # every field the table reads is there
        rows = list(rows_of(results[name]))
        assert rows and all(len(row) == 4 for row in rows), name
    lines, missing = gpu_table.table(out)
    assert missing == []
    printed = proc.stdout.splitlines()
    for line in lines:  # the one table, as bench.gpu_table prints it
        assert line in printed, line
    assert any(line.startswith("bench") and line.rstrip().endswith("value") for line in printed)

    (row,) = results["overhead.json"]["rows"]  # the fair floor ran beside the rest
    assert row["f_asyncllm_stream_tok_s"] > 0 and row["d_over_f"] > 0, row
    cpu = row["cpu_seconds_per_run"]  # the CPU ledger of the espo server's processes (by --espo-url)
    assert cpu["d_espo_shadow"]["policy"] > 0 and cpu["c_espo_none"]["server"] > 0, cpu
    throughput = results["throughput.json"]["summary"]
    assert all(throughput[mode]["tokens"] > 0 for mode in ("none", "espo", "random")), throughput
    critic = results["critic_cost.json"]["rows"]["after"]
    assert critic["none"]["generated_per_run"] > 0 and critic["espo"]["critic_errors"] == 0, critic

    assert tracebacks(proc.stderr) == [], proc.stderr[-5000:]
    # Ours: the espo-server's log and the benches' output (on CPU each bench's in logs/). Not stock
    # `vllm serve`'s (overhead.logs/vllm-serve.log): its own shutdown sometimes logs its output
    # handler's EngineDeadError.
    ours = sorted((out / "logs").glob("*.log"))
    names = {log.name for log in ours}
    assert {"espo-server.log", "overhead.log", "throughput.log", "critic-cost.log"} <= names, names
    for log in ours:
        text = log.read_text(errors="replace")
        assert tracebacks(text) == [], f"{log}:\n{text[-5000:]}"
