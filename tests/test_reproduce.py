"""bench/reproduce.py end to end, reduced (2 rules, 1 seed, 2 iterations): the embedded server, PPO
runs through examples/ppo_toy.py, and the table and plot it writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def reproduce():
    from bench import reproduce

    yield reproduce
    sys.modules.pop("ppo_toy", None)  # examples/ppo_toy.py, loaded by reproduce.main


def test_argument_checks(reproduce):
    args = reproduce.parse_args(["--rules", "random,none,espo", "--seeds", "1"])
    assert args.rules == ["none", "espo", "random"]  # random after espo: it takes espo's stop rate
    for bad in (["--rules", "sometimes"], ["--rules", "random"], ["--seeds", ""]):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)


@pytest.mark.timeout(1200)  # may train the quick toy and start a server first
def test_reduced_reproduction_writes_table_and_plot(reproduce, embedded_server, tmp_path):
    plot = tmp_path / "docs" / "reproduce.png"
    argv = [
        "--url", embedded_server.url,
        "--rules", "none,espo", "--seeds", "0", "--iterations", "2", "--problems", "4", "--n", "2",
        "--eval-every", "1", "--eval-problems", "8", "--out", str(tmp_path / "out"), "--plot", str(plot),
    ]  # fmt: skip
    summary = reproduce.main(argv)

    assert list(summary["table"]) == ["none", "espo"]
    for rule, row in summary["table"].items():
        for metric in ("heldout_acc_t1", "heldout_acc_greedy", "cumulative_tokens", "wall_s"):
            assert row[metric]["n"] == 1 and math.isfinite(row[metric]["mean"]), (rule, metric)
        assert row["cumulative_tokens"]["mean"] > 0
    assert summary["table"]["none"]["stop_rate"]["mean"] == 0.0
    saved = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert [(r["rule"], r["seed"], len(r["records"])) for r in saved["runs"]] == [
        ("none", 0, 2),
        ("espo", 0, 2),
    ]
    for run in saved["runs"]:  # each run saved its critic every iteration, in the server's format
        assert all(Path(rec["critic_checkpoint"], "model.safetensors").exists() for rec in run["records"])
        # ... and pushed it: the server's critic version moved on every iteration
        versions = [rec["critic_version"] for rec in run["records"]]
        assert versions == sorted(set(versions)) and len(versions) == 2, versions
    table = (tmp_path / "out" / "reproduce.md").read_text()
    assert "| none |" in table and "| espo |" in table and "held-out acc T=1" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


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
