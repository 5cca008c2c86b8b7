"""What the benchmarks share: their common flags, servers started on loopback and waited for, the
embedded toy models, /metrics scraped and parsed, the CPU-seconds ledger of a server's processes, and
the result written.

Every benchmark is a module of the `bench` package, run from the repository root:

    .venv/bin/python -m bench.throughput --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from espo_server.config import default_toy_size
from espo_server.process import ServerProcess, espo_server_argv, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------------- flags


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help is the benchmark's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(
    parser: argparse.ArgumentParser, name: str, *, url_help: str = "a running server (default: start one)"
) -> None:
    """--url (measure a running server instead of starting one) and --out (the JSON written)."""
    parser.add_argument("--url", default=None, help=url_help)
    parser.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where the JSON result goes")


def add_toy_args(parser: argparse.ArgumentParser) -> None:
    """--toy-size: the embedded toy models the started server runs on (the server's toy_size)."""
    parser.add_argument(
        "--toy-size", choices=["full", "quick"], default=None,
        help="embedded toy models: full (the tuned toy) or quick (the reduced one the tests use); "
        "default: $ESPO_TOY_SIZE, else full",
    )  # fmt: skip


def toy_size(args: argparse.Namespace) -> str:
    return getattr(args, "toy_size", None) or default_toy_size()


# ------------------------------------------------------------------------------------------- servers


def logs_dir(prefix: str) -> Path:
    """A fresh directory for the logs of the servers a benchmark starts."""
    return Path(tempfile.mkdtemp(prefix=f"espo-{prefix}-"))


def start_espo(
    name: str,
    command: str,
    *flags: str,
    logs: Path,
    ready_path: str = "/readyz",
    port: int | None = None,
    src: str | None = None,
) -> ServerProcess:
    """`espo-server COMMAND FLAGS --port P` on loopback (`port`, or a free one), started
    (`wait_ready()` waits). src: run the espo-server of that source tree instead (its modules first
    on PYTHONPATH)."""
    port = port or free_port()
    argv = espo_server_argv(command, *flags, "--port", str(port))
    if src is not None:  # -P: not the working directory's modules first, the other tree's
        argv = [argv[0], "-P", *argv[1:]]
    server = ServerProcess(name, argv, port, logs, ready_path=ready_path)
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = f"{src}/client:{src}"
    try:
        return server.start()
    finally:
        if src is not None:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)


def start_critic(name: str, model: str, *flags: str, logs: Path, port: int | None = None) -> ServerProcess:
    """`espo-server critic --model MODEL` (float32), started; ready once /health answers."""
    argv = ("--model", model, "--dtype", "float32", *flags)
    return start_espo(name, "critic", *argv, logs=logs, ready_path="/health", port=port)


def wait_ready(url: str, timeout: float = 900.0, path: str = "/readyz", pid: int | None = None) -> None:
    """Until a server this process did not start answers `path` with 200; RuntimeError after `timeout`,
    or as soon as process `pid` (the server, when known) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not psutil.pid_exists(pid):
            raise RuntimeError(f"the server at {url} (pid {pid}) exited before it was ready: see its log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise RuntimeError(f"{url}{path} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def embedded_server(args: argparse.Namespace, *flags: str, name: str = "espo-server") -> Iterator[str]:
    """The URL to measure: `args.url` if given, else an `espo-server serve` on the embedded toy models
    (`--toy-size`) with `flags`, waited for, and stopped on exit."""
    if args.url is not None:
        yield args.url
        return
    server = start_espo(name, "serve", "--toy-size", toy_size(args), *flags, logs=logs_dir(name))
    print(
        f"starting {name} {' '.join(flags)} (engines take about a minute; log {server.log_path}) ...",
        flush=True,
    )
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def toy_task(args: argparse.Namespace):  # -> espo_server.toy.task.TaskSpec
    """The toy task's problems of `--toy-size`, without its models: for a server given by `--url`,
    which may run any models whose vocabulary starts with the toy's characters (the GPU run's)."""
    from espo_server.toy.train import ToyConfig

    return (ToyConfig.quick() if toy_size(args) == "quick" else ToyConfig()).task


def toy_models(args: argparse.Namespace):
    """The embedded toy models of `--toy-size` (trained on first use, then cached). The size is also
    exported as ESPO_TOY_SIZE: what the benchmark runs in its own process (examples/ppo_toy.py) and
    every server it starts use the same toy."""
    from espo_server.toy.train import ensure_toy_models

    size = toy_size(args)
    os.environ["ESPO_TOY_SIZE"] = size
    print(f"toy models ({size}; trained on first use, cached afterwards) ...", flush=True)
    return ensure_toy_models(quick=size == "quick")


# ------------------------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """One scrape of a server's /metrics, parsed by prometheus_client's own exposition parser."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def sum(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 where there is none yet)."""
        return sum(
            value
            for (sample, have), value in self.samples.items()
            if sample == name and all(dict(have).get(k) == v for k, v in labels.items())
        )

    def histogram(self, name: str) -> tuple[float, float, dict[str, float]]:
        """(count, sum, cumulative buckets by `le`) of a histogram (zeros if the server has none)."""
        buckets = {
            dict(labels)["le"]: value
            for (sample, labels), value in self.samples.items()
            if sample == f"{name}_bucket"
        }
        return self.sum(f"{name}_count"), self.sum(f"{name}_sum"), buckets


def scrape(url: str) -> Metrics:
    text = httpx.get(url + "/metrics", timeout=30).text
    return Metrics(
        {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    )


# ---------------------------------------------------------------------------------- CPU ledger

ROLES = ("policy", "critic", "server")


class CpuLedger:
    """CPU-seconds (user + system, from /proc through psutil) of one server's processes, by role:
    `policy` (the policy engine's processes: vLLM's EngineCore and its workers), `critic` (the
    in-process critic engine's), `server` (the server's own process, every thread, and any other
    helper it started). `measure()` around a call gives what that call cost each of them, so a
    critic query's cost is counted rather than inferred from wall time.

    The server starts the policy engine before the critic's, so the older engine process is the
    policy's.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._roles: dict[int, str] = {}

    @classmethod
    def of_url(cls, url: str) -> CpuLedger | None:
        """The ledger of the process listening on `url`'s port on this machine (None: not found)."""
        port = urlsplit(url).port
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                    return cls(conn.pid)
        except psutil.Error:
            pass
        return None

    def _classify(self) -> dict[int, tuple[str, psutil.Process]]:
        engines = engine_cores(self.root)
        found: dict[int, tuple[str, psutil.Process]] = {self.root.pid: ("server", self.root)}
        for order, engine in enumerate(engines):
            role = self._roles.get(engine.pid) or ("policy" if order == 0 else "critic")
            self._roles[engine.pid] = role
            for proc in (engine, *engine.children(recursive=True)):
                found[proc.pid] = (role, proc)
        for proc in self.root.children(recursive=True):
            found.setdefault(proc.pid, ("server", proc))
        return found

    def read(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, CPU-seconds so far) of every process of the server now."""
        out = {}
        for pid, (role, proc) in self._classify().items():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[pid] = (role, times.user + times.system)
        return out

    @staticmethod
    def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU-seconds per role between two `read()`s (a process that started between them counts in
        full; one that ended is lost)."""
        totals = dict.fromkeys(ROLES, 0.0)
        for pid, (role, seconds) in after.items():
            totals[role] = totals.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
        return {role: round(value, 4) for role, value in totals.items()}

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """`with ledger.measure() as cpu: ...`: afterwards `cpu` holds the CPU-seconds per role."""
        spent: dict[str, float] = {}
        before = self.read()
        try:
            yield spent
        finally:
            spent.update(self.spent(before, self.read()))

    def placement(self) -> dict[str, str]:
        """Where each engine's worker may run (Cpus_allowed_list), and the server's process. A worker
        run inline (--cpu-worker inline) is its engine's process."""
        out = {"server": _allowed(self.root)}
        for role, proc in self._classify().values():  # an engine comes before its worker
            if role in ("policy", "critic") and (_is_worker(proc) or is_engine_core(proc)):
                out[f"{role}_worker"] = _allowed(proc)
        return out


def _is_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "Worker" in " ".join(proc.cmdline()) or "Worker" in proc.name()
    return False


def _allowed(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error, OSError):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return "?"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (a hypervisor may hide the rest
    of the name) and its widest vector instructions: two "2-core" machines can differ nearly 2x in
    CPU-seconds for the same work (docs/benchmarks.md, make reproduce's cells)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's block describes them all
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in _VECTOR if flag in flags), "no AVX")
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {vector})"


_VECTOR = (("amx_tile", "AMX, AVX-512"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))


def machine() -> str:
    """The machine a benchmark ran on, as the results record it: its CPU cores and model, and its GPU
    (nvidia-smi)."""
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    return f"{os.cpu_count()} CPU cores, {cpu_model()}" + (f", {gpu}" if gpu else ", no GPU")


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages now (benchmarks record them with their figures)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ledger_summary(runs: list[dict]) -> dict[str, Any] | None:
    """Medians over runs of the CPU-seconds per role (each run's `cpu`, from `CpuLedger.measure`), and
    the critic's CPU-seconds per query (each run's `critic_calls`); None where no run was measured."""
    import statistics

    measured = [r for r in runs if r.get("cpu")]
    if not measured:
        return None
    out: dict[str, Any] = {role: statistics.median(r["cpu"][role] for r in measured) for role in ROLES}
    out["total"] = statistics.median(sum(r["cpu"][role] for role in ROLES) for r in measured)
    per_query = [r["cpu"]["critic"] / r["critic_calls"] for r in measured if r.get("critic_calls")]
    out["critic_per_query"] = statistics.median(per_query) if per_query else None
    out["critic_per_query_range"] = [min(per_query), max(per_query)] if per_query else None
    return out


def print_ledger(rows: dict[str, dict[str, Any] | None], unit: str = "call") -> None:
    """The ledger's table: CPU-seconds per `unit` of each role, and the critic's per query."""
    print(f"\nCPU-seconds per {unit} (user + sys; medians): policy engine, critic engine, server process")
    print(f"{'':<16} {'policy':>8} {'critic':>8} {'server':>8} {'total':>8} {'critic ms/query':>16}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<16} {'(not measured)':>8}")
            continue
        per_query = "-" if r["critic_per_query"] is None else f"{1000 * r['critic_per_query']:.2f}"
        if r.get("critic_per_query_range"):
            low, high = r["critic_per_query_range"]
            per_query += f" ({1000 * low:.2f}-{1000 * high:.2f})"
        print(
            f"{name:<16} {r['policy']:>8.2f} {r['critic']:>8.2f} {r['server']:>8.2f} {r['total']:>8.2f} "
            f"{per_query:>16}"
        )


# -------------------------------------------------------------------------------------------- result


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def engine_cores(proc: psutil.Process) -> list[psutil.Process]:
    """`proc`'s VLLM::EngineCore descendants, oldest first (a server starts its policy engine
    before an in-process critic's)."""
    return sorted((c for c in proc.children(recursive=True) if is_engine_core(c)), key=_created)


def _created(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def is_engine_core(proc: psutil.Process) -> bool:
    """vLLM's engine process: its title is VLLM::EngineCore (the kernel's name of it, cut at 15
    characters, VLLM::EngineCor)."""
    try:
        return "EngineCor" in proc.name() or any("EngineCore" in part for part in proc.cmdline())
    except psutil.Error:
        return False
