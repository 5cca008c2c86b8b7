"""bench/reproduce.py, reduced: the grid of cells (learner, learning rate, rule, seed) on the reduced toy
models, in this process (the stop rule's code on a torch sampler) and through the embedded server
(vLLM); the paired differences, the tables, docs/reproduce.json and the plot it writes."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def reproduce():
    from bench import reproduce

    yield reproduce
    sys.modules.pop("ppo_toy", None)  # examples/ppo_toy.py, loaded by reproduce.main


def test_argument_checks(reproduce):
    args = reproduce.parse_args(["--rules", "random,none,espo", "--seeds", "1", "--lrs", "1e-4,3e-5"])
    assert args.rules == ["none", "espo", "random"]  # random after espo: it takes espo's stop rate
    assert args.lrs == [1e-4, 3e-5] and args.learners == ["gae", "group"]
    for bad in (["--rules", "sometimes"], ["--rules", "random"], ["--seeds", ""], ["--learners", "sgd"]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)


def test_paired_differences_and_their_interval(reproduce):
    p = reproduce.paired([0.02, 0.04, 0.00, 0.06, 0.03])
    half = 2.776 * statistics.stdev([0.02, 0.04, 0.00, 0.06, 0.03]) / math.sqrt(5)
    assert p["mean"] == pytest.approx(0.03) and p["n"] == 5
    assert (p["low"], p["high"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert reproduce.paired([0.1])["low"] is None


def test_random_rate_is_scaled_to_stop_espos_share(reproduce):
    """The random rule draws its step in [min_tokens, max_tokens): scaled so that, on trajectories of
    the mean length, the share it really stops is espo's."""
    import numpy as np

    rate = reproduce.random_rate_for(0.25, mean_length=40, max_tokens=96, min_tokens=8)
    assert rate == pytest.approx(0.25 * 88 / 32)
    rng = np.random.default_rng(0)
    drawn = rng.random(200_000) < rate
    step = rng.integers(8, 96, 200_000)
    assert np.mean(drawn & (step < 40)) == pytest.approx(0.25, abs=0.01)
    assert reproduce.random_rate_for(0.9, mean_length=20, max_tokens=96, min_tokens=8) == 1.0  # capped


def check_outputs(doc: dict, tmp_path: Path, rules: list[str], learners: list[str], seeds: list[int]) -> None:
    cells = doc["cells"]
    assert doc["machine"].startswith(f"{os.cpu_count()} CPU cores, ")
    assert doc["cells_cpu_s"] == pytest.approx(sum(c["cpu_s"] for c in cells))
    assert sorted((c["learner"], c["rule"], c["seed"]) for c in cells) == sorted(
        (learner, rule, seed) for learner in learners for rule in rules for seed in seeds
    )
    for c in cells:
        assert math.isfinite(c["heldout_acc_t1"]) and c["engine_tokens"] > 0, c
        assert c["engine_tokens"] == c["kept_tokens"] + c["discarded_tokens"]
        assert c["curve"][0][:2] == [0, 0] and c["curve"][-1][1] == c["engine_tokens"]
        if c["rule"] == "none":
            assert c["stop_rate"] == 0.0 and c["critic_tokens"] == 0
        if c["rule"] == "espo":
            assert c["critic_calls"] > 0 and c["critic_tokens"] > 0
            assert c["rule_params"]["beta0"] == doc["setups"][str(c["seed"])]["beta0"]["espo"]
    for group in doc["summary"]["groups"]:
        assert set(group["rules"]) == set(rules)
        for rule, row in group["rules"].items():
            if rule == "none":
                continue
            diff = row["acc_minus_none"]
            twins = {
                (c["seed"], c["rule"]): c["heldout_acc_t1"] for c in cells if c["learner"] == group["learner"]
            }
            want = statistics.fmean(twins[(s, rule)] - twins[(s, "none")] for s in seeds)
            assert diff["mean"] == pytest.approx(want) and diff["n"] == len(seeds)
            assert (diff["low"] is None) == (len(seeds) == 1)
    table = (tmp_path / "out" / "reproduce.md").read_text()
    assert all(f"| {rule} |" in table for rule in rules) and "minus none" in table
    plot = tmp_path / "reproduce.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.slow
def test_reduced_reproduction_in_process(reproduce, tmp_path, monkeypatch):
    # One seed: a second would train its own quick toy models first (about a minute here); the
    # interval over seeds is test_paired_differences_and_their_interval's.
    rules, learners, seeds = ["none", "espo", "random", "espo_rfail0"], ["gae", "group"], [0]
    argv = [
        "--quick-models", "--seeds", "0", "--rules", ",".join(rules), "--learners", "gae,group",
        "--lrs", "1e-4", "--iterations", "2", "--problems", "4", "--n", "2", "--max-tokens", "40",
        "--eval-every", "1", "--eval-problems", "16", "--workers", "2", "--critic-latency", "2",
        "--out", str(tmp_path / "out"), "--json", str(tmp_path / "reproduce.json"),
        "--plot", str(tmp_path / "reproduce.png"),
    ]  # fmt: skip
    reproduce.main(argv)
    doc = json.loads((tmp_path / "reproduce.json").read_text())
    check_outputs(doc, tmp_path, rules, learners, seeds)
    rfail0 = [c for c in doc["cells"] if c["rule"] == "espo_rfail0"]
    assert all(c["rule_params"]["r_fail"] == 0.0 for c in rfail0)
    full = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert all(len(c["records"]) == 2 for c in full["cells"])
    # --resume keeps the seed's setup and every finished cell (same flags) instead of computing them
    # again: the same measured wall and CPU seconds come back, and no cell's file is written anew
    kept = {f: f.stat().st_mtime_ns for f in (tmp_path / "out" / "cells").glob("*.json")}
    assert len(kept) == len(doc["cells"])

    def no_setup(job):
        raise AssertionError(f"seed {job[0]}'s setup computed again")

    monkeypatch.setattr(reproduce, "seed_setup", no_setup)
    reproduce.main([*argv, "--resume"])
    assert json.loads((tmp_path / "reproduce.json").read_text())["cells"] == doc["cells"]
    assert {f: f.stat().st_mtime_ns for f in kept} == kept


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(1200)  # may train the quick toy and start a server first
def test_reduced_reproduction_through_the_server(reproduce, embedded_server, tmp_path):
    """The same cells through the embedded server (the session's, on the quick toy of seed 0):
    rollouts from vLLM, the seed's starting policy and critic pushed first, then the learner's every
    iteration."""
    argv = [
        "--backend", "server", "--url", embedded_server.url, "--quick-models", "--seeds", "0",
        "--rules", "none,espo", "--learners", "gae",
        "--lrs", "1e-4", "--iterations", "2", "--problems", "4", "--n", "2", "--max-tokens", "40",
        "--eval-every", "1", "--eval-problems", "8", "--out", str(tmp_path / "out"),
        "--json", str(tmp_path / "reproduce.json"), "--plot", str(tmp_path / "reproduce.png"),
    ]  # fmt: skip
    reproduce.main(argv)
    doc = json.loads((tmp_path / "reproduce.json").read_text())
    check_outputs(doc, tmp_path, ["none", "espo"], ["gae"], [0])
    full = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    for cell in full["cells"]:  # each pushed its critic every iteration: the version moved on
        versions = [rec["critic_version"] for rec in cell["records"]]
        assert versions == sorted(set(versions)) and len(versions) == 2, versions
