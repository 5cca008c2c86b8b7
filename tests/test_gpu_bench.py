"""bench/gpu.sh --smoke: the GPU run's whole pipeline at the tests' size, so it still works on the day a
GPU is lent. Random-weight Qwen2 models made from configs, one espo-server on them, bench/overhead.py
(which also runs an AsyncLLM in its own process and a stock vllm serve), bench/throughput.py and
bench/critic_cost.py against that server, and the one table. Every JSON has what the table reads,
and nothing printed a traceback: not the script, not the benches, not the servers' logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_table
from espo_server.process import ENGINE_ENV
from tests.test_clean_exit import tracebacks

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_its_whole_pipeline_at_smoke_size(tmp_path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, **ENGINE_ENV, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

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
    logs = sorted(out.rglob("*.log"))
    assert out / "logs" / "espo-server.log" in logs and out / "overhead.logs" / "vllm-serve.log" in logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert tracebacks(text) == [], f"{log}:\n{text[-5000:]}"
