"""A server subprocess on loopback: start it, wait until it is ready, stop it (tests, demo, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

CPU_KV_CACHE_BYTES = 2**28
"""On CPU, each engine's KV cache in the servers the tests, the demo and the benchmarks start: 256 MiB
(about 260,000 tokens of the toy model), so that a dozen engines fit on one 24 GiB machine; with
VLLM_CPU_KVCACHE_SPACE's smallest, 1 GiB, each engine took 0.75 GiB more. On GPU vLLM sizes it from
the memory fraction."""
ENGINE_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | (
    {}
    if shutil.which("nvidia-smi")
    else {
        "ESPO_KV_CACHE_MEMORY_BYTES": str(CPU_KV_CACHE_BYTES),
        "ESPO_CRITIC_KV_CACHE_MEMORY_BYTES": str(CPU_KV_CACHE_BYTES),
    }
)
"""The environment of every server started here (ServerProcess)."""


def kv_cache_memory_bytes() -> int | None:
    """The policy KV cache of the servers started here (ESPO_KV_CACHE_MEMORY_BYTES, ENGINE_ENV's over
    the environment's, as ServerProcess passes them on): what the stock vLLM engines the tests and
    benchmarks start beside ours get. Without it vLLM's CPU worker reserves its memory fraction of
    RAM, 0.92 for `vllm serve`, and refuses to start when less is free."""
    raw = {**os.environ, **ENGINE_ENV}.get("ESPO_KV_CACHE_MEMORY_BYTES")
    return int(raw) if raw else None


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Port 0 would give an ephemeral port, and while a server spends a minute starting its engines,
    vLLM's own sockets (also ephemeral) can take that same port before the server binds it. Ports
    below the range are never handed out by the kernel on its own."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class ServerProcess:
    """A subprocess serving HTTP on 127.0.0.1:port, with its log kept in a file."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, ready_path: str = "/readyz"):
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._terminated = False

    def start(self) -> ServerProcess:
        log = open(self.log_path, "w")
        env = {**os.environ, **ENGINE_ENV}
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return self

    def wait_ready(self, timeout: float = 900.0) -> ServerProcess:
        """Until `ready_path` answers 200."""
        return self._wait(
            lambda: httpx.get(self.url + self.ready_path, timeout=5).status_code == 200, timeout
        )

    def wait_listening(self, timeout: float = 900.0) -> ServerProcess:
        """Until it answers HTTP at all (for servers that are expected to stay unready)."""
        return self._wait(lambda: httpx.get(self.url + "/healthz", timeout=5) is not None, timeout)

    def _wait(self, up: Callable[[], bool], timeout: float) -> ServerProcess:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if up():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not up after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def terminate(self) -> None:
        """SIGTERM to the server alone, once, without waiting (`stop` waits): several servers then
        drain and shut their engines down side by side."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the server alone, as an orchestrator sends it (the server drains, shuts its
        engines down and exits), then SIGKILL to whatever is left of its process group. Returns
        the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a straggler of the group (vLLM's engine process)
        self.proc.wait(timeout=10)
        return self.proc.returncode


def espo_server_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "espo_server.cli", *args]


def eager_from_env() -> bool:
    """ESPO_ENFORCE_EAGER, read where no ServerConfig is: the critic server's flag, and the stock vLLM
    engines the benchmarks compare against, so that both sides of a comparison run alike."""
    return os.environ.get("ESPO_ENFORCE_EAGER", "").lower() in ("1", "true", "yes")


def vllm_serve_argv(model: str, *args: str) -> list[str]:
    """Stock `vllm serve MODEL ...` (eager as ESPO_ENFORCE_EAGER says), in vLLM's own process layout,
    as a user would run it. Run as a module: the `vllm` script of the vllm-cpu build looks up a
    distribution named "vllm" for its version and fails."""
    eager = ["--enforce-eager"] if eager_from_env() else []
    kv = kv_cache_memory_bytes()  # the KV cache of the espo servers beside it
    kv_flags = ["--kv-cache-memory-bytes", str(kv)] if kv else []
    entrypoint = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return [*entrypoint, "--model", model, *eager, *kv_flags, *args]


_VLLM_BENCH = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))"
)


def vllm_bench_argv(*args: str) -> list[str]:
    """Stock `vllm bench serve ...`: vLLM's own benchmark client (`vllm.benchmarks.serve`, what the
    `vllm bench serve` subcommand runs), unchanged. Called through its module: on a vllm-cpu install
    the `vllm` command fails looking up a distribution named "vllm", and the module has no
    `__main__`."""
    return [sys.executable, "-c", _VLLM_BENCH, *args]


CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM's (CPU backend) cores for a worker's OpenMP threads, read by the worker when it starts."""


def cpu_worker_from_env() -> str:
    """ESPO_CPU_WORKER (`inline`, the default, or `spawn`), read where no ServerConfig is: the critic
    server's default, and the bare AsyncLLM the benchmarks compare against, so both sides run alike."""
    return os.environ.get("ESPO_CPU_WORKER", "").lower() or "inline"


def inline_cores(cpu_cores: str | None, share: str = "first") -> str | None:
    """The cores of an inline CPU worker: `cpu_cores` when named, else its share of the cores this
    process may use, as vLLM's `auto` binding shares them (the last core left to the rest). An inline
    worker left unbound ran 1.6-2.6x slower here (docs/benchmarks.md), so it always gets cores:
    `first` (all but the last: a policy, or an engine alone) or `last` (an in-process critic)."""
    if cpu_cores:
        return cpu_cores
    allowed = sorted(os.sched_getaffinity(0))
    picked = allowed[-1:] if share == "last" else allowed[:-1] or allowed
    return ",".join(map(str, picked))


def core_ids(cpu_cores: str) -> list[int]:
    """`0`, `0-3` or `1,3-4` as core ids."""
    ids: list[int] = []
    for part in cpu_cores.split(","):
        first, _, last = part.partition("-")
        ids += range(int(first), int(last or first) + 1)
    return ids


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ENGINE_ONEDNN_CACHE = "0"
"""oneDNN's own primitive cache in every engine process: off (unless the environment sets it).

vLLM's CPU linear layers run oneDNN matmuls built for each number of tokens in a step (M), and keep
32 per weight shape themselves; oneDNN's global cache kept up to 1,024 more (its default), each
with its JIT-compiled kernels. A critic asked about prefixes of every length sees a new M in most
steps, so its engine's `[heap]` grew until that cache was full: +284 MiB, levelling off, after
173,000 queries of random length on the tiny critic (bench/engine_memory.py); the 45-minute soak
had reached +256. With the cache off it stays flat (+18 MiB, within its trimming's sawtooth, after
127,000 queries), at the same queries per second (docs/reliability.md)."""


@contextlib.contextmanager
def engine_spawn_env(cpu_cores: str | None, *, inline: bool = False) -> Iterator[None]:
    """The environment an engine's processes are spawned with (they inherit it); this process's own
    environment is restored after.

    A spawned worker (vLLM's CPU layout): VLLM_CPU_OMP_THREADS_BIND=`cpu_cores`, which vLLM turns into
    the worker's OpenMP binding. An inline worker (in the engine process): vLLM binds only the workers
    it spawns, so OpenMP binds the engine process's threads itself (OMP_PLACES, OMP_PROC_BIND,
    OMP_NUM_THREADS) when cores are named; and VLLM_ENABLE_V1_MULTIPROCESSING=0, without which vLLM's
    CPU platform turns the `uni` executor back into `mp`. Always: oneDNN's primitive cache off
    (ENGINE_ONEDNN_CACHE), unless this process's environment sets ONEDNN_PRIMITIVE_CACHE_CAPACITY."""
    env: dict[str, str] = {} if ONEDNN_CACHE in os.environ else {ONEDNN_CACHE: ENGINE_ONEDNN_CACHE}
    if inline:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cpu_cores and cpu_cores not in ("auto", "nobind"):
            ids = core_ids(cpu_cores)
            env |= {"OMP_NUM_THREADS": str(len(ids)), "OMP_PROC_BIND": "true"}
            env["OMP_PLACES"] = "{" + ",".join(map(str, ids)) + "}"
    elif cpu_cores:
        env[CPU_BIND] = cpu_cores
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
