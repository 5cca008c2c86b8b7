"""The demo's savings table from hand-made rows: engine tokens (kept + discarded past stops) are
what "saved", "fewer" and the oracle share compare; the table printed is the table `--json` writes."""

from __future__ import annotations

import pytest

from espo_server.toy.demo import COLUMNS, print_table, table


def row(kept: int, discarded: int = 0, saved: int | None = None, stop: float = 0.0, shadow: float = 0.0):
    return {
        "n": 256, "accuracy": 0.5, "tokens_generated": kept, "engine_tokens": kept + discarded,
        "discarded_tokens": discarded, "critic_tokens": 40 if discarded else 0, "critic_calls": 3,
        "tokens_saved": saved, "stop_rate": stop, "shadow_stop_rate": shadow, "false_stop_rate": 0.1,
        "median_detection_delay": 2.0, "failing_ran_to_end": 100, "failing_stopped": 30, "wall_s": 1.0,
    }  # fmt: skip


RESULT = {
    "rows": {
        "none": row(10_000),
        "espo shadow": row(10_000, saved=2_000, shadow=0.3),
        "espo": row(8_000, discarded=500, stop=0.3),
        "regret_only shadow": row(10_000, saved=1_900, shadow=0.3),
        "regret_only": row(8_100, stop=0.3),
    },
    "oracle_tokens_saved": 3_000,
    "regret_only_beta": 12.5,
}


def test_savings_count_engine_tokens_and_the_oracle_share_is_on_the_same_basis(capsys):
    t = table(RESULT)
    assert t["columns"] == list(COLUMNS)
    rows = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in t["rows"]}
    espo = rows["espo"]
    # 8,000 kept + 500 thrown away past stops: the engine computed 8,500, so 15% fewer than none, not 20%
    assert (espo["engine tokens"], espo["kept"], espo["discarded"]) == (8_500, 8_000, 500)
    assert espo["saved"] == 1_500 and espo["fewer"] == pytest.approx(0.15)
    assert t["gate"]["espo"]["fewer_tokens"] == pytest.approx(0.15)
    assert t["gate"]["espo"]["oracle_share"] == pytest.approx(1_500 / 3_000)
    assert t["gate"]["regret_only"]["oracle_share"] == pytest.approx(1_900 / 3_000)
    assert rows["espo shadow"]["saved"] == 2_000 and rows["espo shadow"]["fewer"] == pytest.approx(0.2)
    assert rows["none"]["saved"] is None and rows["none"]["stop rate"] is None
    print_table(t)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["mode", "traj", "acc", "engine"]
    espo_line = next(line for line in lines if line.split()[:2] == ["espo", "256"])
    assert espo_line.split()[3:9] == ["8500", "8000", "500", "40", "1500", "15.0%"]
    assert all(line in out for line in t["lines"])
