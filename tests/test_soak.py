"""The soak, the faults and the fuzz of bench/ in reduced form, on real servers (their full runs:
make soak, make faults, make fuzz; figures in docs/benchmarks.md). The soak and the fuzz run as
scripts against the session's rollout server and read back their JSON (each script checks what it
measures and exits non-zero when a check fails); the faults call bench/faults.py's steps: broken
weight pushes to the session's server, and vLLM's engine process killed under the session's orphan
server. Timings are not checked here (bench figures are measured under the exclusive lock).

This file runs after every other user of the session's rollout server (it leaves the server-owned
ESPO state and the policy version moved)."""

from __future__ import annotations

import json

import pytest

from bench import faults
from bench.fuzz import NEED_AN_UPLOAD
from tests.scripts import run_bench

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_soak_delivers_every_trajectory_once_and_metrics_match(
    rollout_server, critic_server, tiny_models, tmp_path
):
    """3 clients (sync and async), each running every scenario once (a workload of a fixed size,
    whatever the machine's speed), a weight push after every 6 scenarios, by upload and by path in
    turn, RSS sampled every second: bench/soak.py's checks."""
    out = tmp_path / "soak.json"
    proc = run_bench(
        "soak", "--url", rollout_server.url, "--pid", str(rollout_server.proc.pid),
        "--critic-pid", str(critic_server.proc.pid), "--rss-every-s", "1",
        "--weights", str(tiny_models["policy"]), str(tiny_models["policy_b"]),
        "--clients", "3", "--seconds", "0", "--push-every-calls", "6", "--warmup", "0", "--out", str(out),
        timeout=600,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-5000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], (result["checks"], result["explained"], result["errors"])
    assert result["calls_answered"] >= 10 and result["trajectories"] >= 40, result
    assert result["replays"] > 0 and result["weight_pushes"] >= 2 and result["stopped"] > 0, result
    assert result["weight_pushes_by_upload"] >= 1 and result["weight_pushes_by_path"] >= 1, result
    for kind in ("call", "replay", "conflict", "timeout", "abandon", "run"):
        assert result["scenarios"].get(kind, 0) > 0, result["scenarios"]
    assert result["errors"].get("409", 0) >= result["scenarios"]["conflict"] > 0  # each one refused
    assert set(result["errors"]) <= {"409", "429", "client_timeout", "abandoned"}, result["errors"]
    moved, seen = result["metrics_moved"], result["clients_saw"]
    assert moved == seen and moved["espo_trajectories_total"] == result["trajectories"] > 0
    assert moved["espo_weight_push_seconds_count{source=upload}"] == result["weight_pushes_by_upload"]
    memory = result["rss_mb"]  # the server and both engines' process trees, sampled
    assert set(memory) >= {"server", "policy_engine", "critic_engine"}, memory
    assert all(memory[n]["end"] > 0 and memory[n]["plateau"] > 0 for n in ("policy_engine", "critic_engine"))
    assert len(result["rss_curve"]) >= 2 and "critic_engine" in result["rss_curve"][-1], result["rss_curve"]


def test_fuzz_finds_no_5xx_and_the_server_keeps_serving(rollout_server, tmp_path):
    """bench/fuzz.py against the session's server: schemathesis, every operation, 15 examples each
    (no time limit: the number of cases does not depend on the machine's speed), in the phases
    coverage, fuzzing and stateful (chains along the schema's links from opened uploads and runs)."""
    out = tmp_path / "fuzz.json"
    proc = run_bench(
        "fuzz", "--url", rollout_server.url, "--log", str(rollout_server.log_path),
        "--max-examples", "15", "--max-time", "0", "--workers", "1", "--out", str(out), timeout=600,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-5000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], (result["checks"], result["output_tail"])
    assert result["cases"] >= 100, result["cases"]
    statuses = result["answers_by_status"]
    assert sum(statuses.values()) >= 100 and not any(s.startswith("5") for s in statuses), statuses
    assert any(s.startswith("4") for s in statuses), statuses  # hostile bodies were sent and refused
    fuzzed = result["weight_upload_and_file_answers"]  # the upload and weight-file routes are in
    assert fuzzed.get("uploads", 0) > 0 and fuzzed.get("files", 0) > 0, fuzzed
    assert {result["phases"][p] for p in ("coverage", "fuzzing", "stateful")} == {"passed"}, result["phases"]
    # the upload-id routes were called with ids the server handed out (its 120 s upload expiry keeps the
    # one upload slot taken by the first one left open, so they need not have met a live one here)
    answered = result["upload_id_answers"]
    assert all(answered.get(route, {}).get("handed_out") for route in NEED_AN_UPLOAD), answered


def test_broken_weight_pushes_are_refused_and_the_old_weights_still_serve(
    rollout_server, tiny_models, tmp_path
):
    result = faults.broken_weights(
        rollout_server, tmp_path / "broken", str(tiny_models["critic"]), str(tiny_models["policy"])
    )
    assert result["checks"] and all(result["checks"].values()), result


def test_a_killed_engine_process_gives_503_engine_dead_and_exit_status_3(orphan_server):
    """On the session's orphan server (its last user: this file runs after tests/test_critics.py)."""
    result = faults.engine_kill(orphan_server.wait_ready(), bound_s=60)
    assert result["checks"] and all(result["checks"].values()), result
    assert result["exit_status"] == 3
