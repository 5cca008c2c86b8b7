"""The main job end to end: `espo-server demo` builds (or reuses) the toy models, starts the embedded
server (toy policy + in-process critic), and measures none / espo shadow / espo on toy problems."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from espo_server.process import ENGINE_ENV, free_port
from tests.conftest import CRITIC_TIMEOUT_S
from tests.test_clean_exit import tracebacks

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.timeout(1200)  # may train the quick toy and start a server first
def test_demo_runs_the_embedded_server_and_reports_savings(quick_toy, tmp_path):
    out = tmp_path / "demo.json"
    argv = [sys.executable, "-m", "espo_server.cli", "demo", "--port", str(free_port()), "--problems", "64",
            "--n", "4", "--json", str(out)]  # fmt: skip
    env = {**os.environ, **ENGINE_ENV, "ESPO_CRITIC_TIMEOUT_S": CRITIC_TIMEOUT_S}  # the server it starts
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3000, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "false stops" in proc.stdout and "oracle" in proc.stdout
    # it ends cleanly: no traceback from the demo, nor from the server it started and stopped
    server_log = Path(re.search(r"\(engines take .*; log (\S+)\)", proc.stdout).group(1))
    assert tracebacks(proc.stderr) == [] and tracebacks(server_log.read_text()) == [], server_log
    result = json.loads(out.read_text())
    # the embedded default scores eos trajectories with the toy verifier (verifier=auto)
    assert result["verifier"] == "toy"
    rewards = result["server_rewards"]
    assert rewards["eos"] > 0 and rewards["missing"] == 0 and rewards["disagreeing"] == 0, rewards
    rows = result["rows"]
    none, shadow, real = rows["none"], rows["espo shadow"], rows["espo"]
    assert none["n"] == shadow["n"] == real["n"] == 256
    # the toy policy is a mid-accuracy one: it fails part-way often enough for stopping to matter
    assert 0.2 <= none["accuracy"] <= 0.8
    assert none["failing_ran_to_end"] > 50
    # shadow: same tokens as none (same seeds, nothing cut); the rule would stop a good share of failures
    assert shadow["tokens_generated"] == none["tokens_generated"]
    assert shadow["failing_stopped"] >= 0.2 * shadow["failing_ran_to_end"]
    assert shadow["false_stop_rate"] is not None and shadow["false_stop_rate"] < 0.5
    assert shadow["tokens_saved"] > 0
    # stopping for real generates fewer tokens
    assert real["stop_rate"] > 0 and real["tokens_generated"] < none["tokens_generated"]
    # engine tokens: kept plus thrown away past stops, in the usage of every mode
    for r in rows.values():
        assert r["engine_tokens"] == r["tokens_generated"] + r["discarded_tokens"]
    # same seeds, so a stopped sample generated at most what its none twin did (equal when the critic
    # answered only after the sample's end: then every token past the stop was thrown away)
    assert real["engine_tokens"] <= none["engine_tokens"] and shadow["discarded_tokens"] == 0
    # --json writes the table the demo printed, whose savings count engine tokens
    table = result["table"]
    lines = proc.stdout.splitlines()
    for row in table["rows"]:
        r = dict(zip(table["columns"], row, strict=True))
        line = next(x for x in lines if x.startswith(f"{r['mode']:<18} {r['traj']:>5} "))
        columns = ("engine tokens", "kept", "discarded", "critic tokens")
        assert line[18:].split()[2:6] == [str(r[c]) for c in columns]
        assert r["engine tokens"] == r["kept"] + r["discarded"]
    espo = dict(zip(table["columns"], next(r for r in table["rows"] if r[0] == "espo"), strict=True))
    assert espo["saved"] == none["engine_tokens"] - real["engine_tokens"]
    assert table["gate"]["espo"]["oracle_share"] == espo["saved"] / result["oracle_tokens_saved"]
    assert all(line in proc.stdout for line in table["lines"])
