"""The benchmarks run end to end at tiny sizes, so they never rot (their figures are not checked:
timings belong to the benchmarks themselves, run on a quiet machine)."""

from __future__ import annotations

import json
import os

import pytest

from tests.scripts import run_bench

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.timeout(1200)  # may train the quick toy and start a server first
def test_throughput_bench_runs_every_mode(embedded_server, tmp_path):
    """Against the session's embedded server (quick toy models, 8 engine slots)."""
    out = tmp_path / "throughput.json"
    proc = run_bench(
        "throughput", "--url", embedded_server.url, "--problems", "8", "--n", "2", "--repeats", "1",
        "--out", str(out), timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target espo/none" in proc.stdout and "time to B groups" in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["engine_max_num_seqs"] == 8
    summary = result["summary"]
    assert set(summary) == {"none", "espo", "random", "over:none", "over:espo"}
    assert all(row["wall_s"] > 0 and row["tokens"] > 0 for row in summary.values())
    for mode in ("over:none", "over:espo"):  # 11 prompts sent, the first 8 complete groups returned
        assert result["runs"][mode][0]["groups_returned"] == 8
    # the CPU-seconds ledger: each engine's processes and the server's, told apart and counted
    cpu = result["cpu_seconds_per_batch"]
    assert all(cpu[mode]["policy"] > 0 and cpu[mode]["server"] > 0 for mode in summary), cpu
    assert cpu["espo"]["critic"] > 0 and cpu["espo"]["critic_per_query"] > 0, cpu
    assert cpu["none"]["critic"] < cpu["espo"]["critic"], cpu  # none never asks the critic
    cores = sorted(os.sched_getaffinity(0))  # the fixture's --cpu-cores and --critic-cpu-cores
    placement = result["placement"]
    assert (placement["policy_worker"], placement["critic_worker"]) == (str(cores[0]), str(cores[-1]))
    assert "CPU-seconds per batch" in proc.stdout


def test_push_bench_runs(tmp_path):
    """A tiny Qwen2-style model, one push each way: the bench runs end to end and writes its figures."""
    out = tmp_path / "push.json"
    proc = run_bench(
        "push", "--hidden", "128", "--layers", "2", "--vocab", "64", "--repeats", "1", "--out", str(out),
        timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "upload / path:" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["seconds"]["path"]) == len(result["seconds"]["upload"]) == 1
    assert result["upload_mib_per_s"][0] > 0 and result["upload_over_path"] > 0
