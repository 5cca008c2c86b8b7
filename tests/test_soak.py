"""The soak, the faults and the fuzz of bench/ in reduced form (their full runs: make soak, make
faults, make fuzz). Each script checks what it measures and exits non-zero when a check fails;
these tests run them and read their JSON. Timings are not checked here (bench figures belong to
the README, measured under the exclusive lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from espo_server.process import ENGINE_ENV

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENGINE_ENV}
    )


def test_soak_delivers_every_trajectory_once_and_metrics_match(rollout_server, tiny_models, tmp_path):
    """4 clients for 60 s on the session's server (remote critic), with weight pushes."""
    out = tmp_path / "soak.json"
    proc = run_bench(
        "soak.py", "--url", rollout_server.url, "--pid", str(rollout_server.proc.pid),
        "--weights", str(tiny_models["policy"]), str(tiny_models["policy_b"]),
        "--clients", "4", "--seconds", "60", "--push-every", "15", "--warmup", "15", "--out", str(out),
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and all(result["checks"].values())
    assert result["calls_answered"] >= 20 and result["trajectories"] >= 100, result
    assert result["replays"] > 0 and result["weight_pushes"] >= 2 and result["stopped"] > 0
    for kind in ("call", "replay", "timeout", "abandon", "run"):
        assert result["scenarios"].get(kind, 0) > 0, result["scenarios"]
    assert set(result["errors"]) <= {"409", "429", "client_timeout", "abandoned"}, result["errors"]


def test_faults_critic_outage_broken_weights_sigterm_and_engine_death(tmp_path):
    """bench/faults.py --quick: its own critic and two servers; every check of every step."""
    out = tmp_path / "faults.json"
    proc = run_bench("faults.py", "--quick", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for step in ("critic", "weights", "sigterm", "engine"):
        assert result[step]["checks"] and all(result[step]["checks"].values()), (step, result[step])
    assert result["critic"]["soak"]["critic_error_trajectories"] > 0
    assert result["sigterm"]["exit_status"] == 0 and result["engine"]["exit_status"] == 3


def test_fuzz_finds_no_5xx_and_the_server_keeps_serving(tmp_path):
    """bench/fuzz.py with 25 cases per operation (several hundred in all)."""
    out = tmp_path / "fuzz.json"
    proc = run_bench("fuzz.py", "--max-examples", "25", "--out", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["cases"] >= 300, result
    assert not any(status.startswith("5") for status in result["answers_by_status"])
