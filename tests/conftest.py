"""Shared fixtures: tiny models made from a seed, and real servers on loopback (started once)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from espo_server.process import ServerProcess, espo_server_argv, free_port

# Tests never train the full toy models (about 15 minutes on 2 cores): every embedded server, demo,
# benchmark and example they start, in this process or another, runs on the quick toy (about a minute).
os.environ["ESPO_TOY_SIZE"] = "quick"
# Every engine the tests start runs eagerly: no torch.compile warm-up, about 20 s less per start.
os.environ["ESPO_ENFORCE_EAGER"] = "true"
# Even eager, vLLM's sampler compiles one small function with inductor (batched_count_greater_than:
# the rank of each sampled token's logprob); run eagerly it gives the same integer counts, and no
# engine compiles or writes torch's compile cache (each would compile it until the first had written
# that cache). Inherited by every process the tests start.
os.environ["TORCHDYNAMO_DISABLE"] = "1"

MAX_MODEL_LEN = 512
CRITIC_TIMEOUT_S = "60"
"""The session servers' critic timeout: far above any query's time on a loaded machine, so that no
test sees a critic error it did not provoke (the default, 5 s, was reached under load)."""

# The client tests' fixtures (connect, replicas, loop) over the fake rollout server.
pytest_plugins = ["tests.fake_server"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A random-weight policy + critic (seed 0), and a second policy (seed 7) for weight pushes."""
    from espo_server.tiny_model import make_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    policy, critic = make_tiny_models(root / "a", seed=0)
    policy_b, _ = make_tiny_models(root / "b", seed=7)
    return {"policy": policy, "critic": critic, "policy_b": policy_b}


@pytest.fixture(scope="session")
def quick_toy():
    """The quick toy models (ESPO_TOY_SIZE above), trained once into the toy cache ($ESPO_CACHE_DIR)
    and shared by every test, in this process or another, that runs the embedded toy."""
    from espo_server.toy.train import ensure_toy_models

    return ensure_toy_models(quick=True)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


class SessionServers:
    """The session's servers on the tiny models. Those the selected tests use are started together
    before the first test (`session_servers`): their engines load side by side on both cores instead
    of one after another. Each server's fixture then waits until its own is up."""

    def __init__(self, tiny_models: dict[str, Path], logs: Path, base: Path) -> None:
        self.tiny, self.logs, self.base = tiny_models, logs, base
        self.started: dict[str, ServerProcess | Exception] = {}

    def get(self, name: str) -> ServerProcess:
        """The server `name`, started now if it was not; a start that failed fails again here, in the
        fixture of each test that uses it (and only there)."""
        if name not in self.started:
            try:
                self.started[name] = getattr(self, name)().start()
            except Exception as exc:
                self.started[name] = exc
        server = self.started[name]
        if isinstance(server, Exception):
            raise RuntimeError(f"{name} could not be started") from server
        return server

    def critic_server(self) -> ServerProcess:
        """`espo-server critic` serving the tiny critic over POST /v1/values."""
        port = free_port()
        argv = espo_server_argv(
            "critic", "--model", str(self.tiny["critic"]), "--port", str(port), "--dtype", "float32",
            "--weights-dir", str(self.base),  # every test's checkpoints live there
        )  # fmt: skip
        return ServerProcess("critic", argv, port, self.logs, ready_path="/health")

    def rollout_server(self) -> ServerProcess:
        """The rollout server on the tiny policy, float32 (for HF parity), with the remote critic:
        started once the critic is up, so that it reads the critic's version when it starts."""
        critic = self.get("critic_server").wait_ready()
        port = free_port()
        argv = espo_server_argv(
            "serve",
            "--model", str(self.tiny["policy"]),
            "--critic", "remote",
            "--critic-url", critic.url,
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--port", str(port),
            "--verifier", "toy",
            "--max-n", "32",
            "--max-num-seqs", "48",
            "--critic-timeout-s", CRITIC_TIMEOUT_S,
            "--weights-dir", str(self.base),  # every test's checkpoints live there
        )  # fmt: skip
        return ServerProcess("rollout", argv, port, self.logs)

    def orphan_server(self) -> ServerProcess:
        """A rollout server whose remote critic is not there (tests/test_critics.py), and whose engine
        process tests/test_soak.py kills at the end (it answers 503 engine_dead for 20 s, then exits)."""
        port, dead = free_port(), free_port()
        argv = espo_server_argv(
            "serve", "--model", str(self.tiny["policy"]), "--critic", "remote",
            "--critic-url", f"http://127.0.0.1:{dead}", "--critic-timeout-s", "1", "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64", "--port", str(port),
            "--verifier", "none", "--engine-dead-linger-s", "20",
        )  # fmt: skip
        return ServerProcess("orphan", argv, port, self.logs)

    def inprocess_server(self) -> ServerProcess:
        """The embedded default's layout on the tiny models: policy and critic engines in one process
        (`--critic inprocess`), with the gRPC API on a second port (`server.grpc_port`). The tiny
        tokenizer has a chat template (tiny_model.CHAT_TEMPLATE)."""
        port, grpc_port = free_port(), free_port()
        argv = espo_server_argv(
            "serve",
            "--model", str(self.tiny["policy"]),
            "--critic-model", str(self.tiny["critic"]),
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--port", str(port),
            "--grpc-port", str(grpc_port),
            "--served-model-name", "tiny",
            "--verifier", "toy",
            "--critic-timeout-s", CRITIC_TIMEOUT_S,
            "--weights-dir", str(self.base),
        )  # fmt: skip
        server = ServerProcess("inprocess", argv, port, self.logs)
        server.grpc_port = grpc_port  # type: ignore[attr-defined]
        return server

    def stop(self) -> None:
        servers = [s for s in self.started.values() if isinstance(s, ServerProcess)]
        for server in servers:
            server.terminate()  # all at once: their engines shut down side by side
        for server in servers:
            server.stop()


SESSION_SERVERS = ("critic_server", "orphan_server", "inprocess_server", "rollout_server")
"""In the order they are started: the rollout server last, as it waits for the critic to be up."""


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    used = {name for item in items for name in getattr(item, "fixturenames", ())}
    config.stash[_WANTED] = [name for name in SESSION_SERVERS if name in used]


_WANTED = pytest.StashKey[list]()


@pytest.fixture(scope="session", autouse=True)
def session_servers(request, server_logs, tmp_path_factory) -> Iterator[SessionServers]:
    """Starts, before the first test, every session server the selected tests use (none: nothing,
    and no tiny models are made)."""
    wanted = request.config.stash.get(_WANTED, [])
    tiny = request.getfixturevalue("tiny_models") if wanted else {}
    servers = SessionServers(tiny, server_logs, tmp_path_factory.getbasetemp())
    try:
        for name in wanted:  # a server that fails to start fails the tests that use it
            with contextlib.suppress(RuntimeError):
                servers.get(name)
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def critic_server(session_servers: SessionServers) -> ServerProcess:
    return session_servers.get("critic_server").wait_ready()


@pytest.fixture(scope="session")
def rollout_server(session_servers: SessionServers) -> ServerProcess:
    return session_servers.get("rollout_server").wait_ready()


@pytest.fixture(scope="session")
def orphan_server(session_servers: SessionServers) -> ServerProcess:
    return session_servers.get("orphan_server").wait_listening()


@pytest.fixture(scope="session")
def inprocess_server(session_servers: SessionServers) -> ServerProcess:
    return session_servers.get("inprocess_server").wait_ready()


@pytest.fixture(scope="session")
def embedded_server(quick_toy, server_logs, tmp_path_factory) -> Iterator[ServerProcess]:
    """The embedded default (`espo-server serve` naming no model: the toy policy and an in-process
    critic), on the quick toy, with 8 engine slots; the benchmarks and the reproduction the tests run
    share it (`--url`). Pushes may come from the toy cache and from every test's directory. Its
    engines' workers are placed by hand: the policy on the first core, the critic on the last."""
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    weights = ["--weights-dir", str(quick_toy.policy_dir.parent)]
    weights += ["--weights-dir", str(tmp_path_factory.getbasetemp())]
    flags = ["--toy-size", "quick", "--max-num-seqs", "8", "--critic-timeout-s", CRITIC_TIMEOUT_S, *weights]
    flags += ["--port", str(port), "--cpu-cores", str(cores[0]), "--critic-cpu-cores", str(cores[-1])]
    argv = espo_server_argv("serve", *flags)
    with ServerProcess("embedded", argv, port, server_logs) as proc:
        yield proc.wait_ready()
