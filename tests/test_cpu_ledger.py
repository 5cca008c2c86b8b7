"""The benchmarks' CPU ledger (bench.harness.CpuLedger) on a process tree shaped like a server's:
a root (the server), two VLLM::EngineCore processes each with a worker below it, and a helper.
No engine runs: the engines are shell processes named as vLLM names its engine. And the machine
the benchmarks record (bench.harness.cpu_model)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from bench.harness import CpuLedger, cpu_model, engine_cores
from tests.waiting import wait_until

# The root starts the policy engine, waits for a line (the test sends it once the clock has moved
# past the first engine's start, so their start times differ), then the critic's engine below a
# helper process (a grandchild: found all the same) and a plain helper.
ROOT = textwrap.dedent(
    """
    import subprocess, sys
    engine = ["bash", "-c", "exec -a VLLM::EngineCore bash -c 'sleep 600 & wait'"]
    kids = [subprocess.Popen(engine)]
    sys.stdin.readline()
    below = "n=Engine; exec -a VLLM::${n}Core bash -c 'sleep 600 & wait' & wait"  # own line: no EngineCore
    kids.append(subprocess.Popen(["bash", "-c", below]))
    kids.append(subprocess.Popen(["sleep", "600"]))
    print("started", flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture
def server_tree():
    root = subprocess.Popen(
        [sys.executable, "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    proc = psutil.Process(root.pid)
    try:
        wait_until(lambda: len(engine_cores(proc)) == 1, "the first engine process")
        first = engine_cores(proc)[0].create_time()
        wait_until(lambda: time.time() > first + 0.05, "the clock past the first engine's start")
        root.stdin.write("\n")
        root.stdin.flush()
        assert root.stdout.readline().strip() == "started"
        wait_until(
            lambda: all(e.children() for e in engine_cores(proc)) and len(engine_cores(proc)) == 2,
            "both engines and their workers",
        )
        yield proc
    finally:
        for child in proc.children(recursive=True):
            child.kill()
        root.kill()
        root.wait()


def test_roles_by_engine_age_workers_take_their_engines_role(server_tree: psutil.Process) -> None:
    policy, critic = engine_cores(server_tree)
    ledger = CpuLedger(server_tree.pid)
    roles = {pid: role for pid, (role, _) in ledger.read().items()}
    assert roles[server_tree.pid] == "server"
    assert roles[policy.pid] == "policy" and roles[critic.pid] == "critic"
    for worker in policy.children(recursive=True):
        assert roles[worker.pid] == "policy"
    for worker in critic.children(recursive=True):
        assert roles[worker.pid] == "critic"
    others = {p.pid for p in server_tree.children(recursive=True)} - {
        p.pid for e in (policy, critic) for p in (e, *e.children(recursive=True))
    }
    assert others, "the tree has helpers outside the engines"
    assert all(roles[pid] == "server" for pid in others)


def test_spent_counts_each_role_and_nothing_negative(server_tree: psutil.Process) -> None:
    ledger = CpuLedger(server_tree.pid)
    with ledger.measure() as cpu:
        sum(range(100_000))  # this process is not in the tree: it adds nothing
    assert set(cpu) == {"policy", "critic", "server"}
    assert all(seconds >= 0.0 for seconds in cpu.values())
    before = {pid: ("policy", 1.0) for pid in ledger.read()}
    after = {pid: ("policy", 1.5) for pid in before}
    assert CpuLedger.spent(before, after)["policy"] == pytest.approx(0.5 * len(before))


def test_the_cpu_recorded_names_its_model_and_widest_vector_instructions(tmp_path) -> None:
    block = "processor\t: {n}\nmodel name\t: Some CPU\ncpu family\t: 6\nmodel\t\t: 143\n"
    block += "flags\t\t: {flags}\n\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(n=0, flags="fpu avx avx2 avx512f") + block.format(n=1, flags="fpu"))
    assert cpu_model(cpuinfo) == "Some CPU (family 6 model 143, AVX-512)"
    cpuinfo.write_text(block.format(n=0, flags="fpu sse2 avx avx2"))
    assert cpu_model(cpuinfo) == "Some CPU (family 6 model 143, AVX2)"
    assert cpu_model(tmp_path / "missing") == "unknown CPU (family ? model ?, no AVX)"
