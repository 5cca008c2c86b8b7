"""Processes that start engines end cleanly, and run on a read-only root file system.

* A rollout server (policy and critic engines in one process) and a critic server, on the tiny
  models, each started as the Kubernetes pods run them: a read-only root file system (in a mount
  namespace of their own, when this machine allows one) with only the pods' writable volumes
  writable ($HOME and TMPDIR for /tmp, the cache directory and XDG_CACHE_HOME for
  /var/cache/espo-server), and an admin port. They serve, take a weight push on the admin port
  only, and after SIGTERM exit 0 with no traceback in their output (vLLM's `AsyncLLM.__del__` used
  to print one at every exit: async_llm.shutdown_engine).
* bench/overhead.py, which also runs an AsyncLLM in its own process, ends with no traceback: checked
  by test_gpu_bench.py, which runs it (with the other benchmarks) through bench/gpu.sh --smoke.
* `espo-server demo` (test_embedded_demo.py) checks its own output and its server's log with
  `tracebacks` below.
"""

from __future__ import annotations

import shlex
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from espo_server.process import ServerProcess, espo_server_argv, free_port

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]


def tracebacks(text: str) -> list[str]:
    """The lines of a process's output that start a traceback or an "Exception ignored" report."""
    return [
        line
        for line in text.splitlines()
        if "Traceback (most recent call last)" in line or "Exception ignored in" in line
    ]


def mount_namespaces() -> bool:
    """Whether this machine lets a process remount / read-only in a mount namespace of its own."""
    probe = "mount --make-rprivate / && mount -o remount,bind,ro / && ! touch /espo-read-only-probe"
    try:
        return (
            subprocess.run(
                ["unshare", "--mount", "sh", "-c", probe], capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def read_only_root(argv: list[str], writable: list[Path]) -> list[str]:
    """`argv` run with / read-only except `writable` (bind mounts), as a pod with
    readOnlyRootFilesystem and its volumes; the same pid (exec), so SIGTERM reaches the server."""
    binds = " && ".join(f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))}" for d in writable)
    script = f'mount --make-rprivate / && {binds} && mount -o remount,bind,ro / && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", *argv]


@pytest.fixture
def pod_volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """The pods' writable volumes (deploy/kubernetes/base: tmp, cache) as directories here, and the
    environment the pods set pointing into them (HOME=/tmp, XDG_CACHE_HOME under the cache)."""
    volumes = {name: tmp_path / name for name in ("tmp", "cache", "logs")}
    for path in volumes.values():
        path.mkdir()
    monkeypatch.setenv("HOME", str(volumes["tmp"]))
    monkeypatch.setenv("TMPDIR", str(volumes["tmp"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(volumes["cache"] / "xdg"))
    monkeypatch.setenv("ESPO_CACHE_DIR", str(volumes["cache"]))
    # Torch's inductor cache (vLLM's sampler compiles a kernel even with --enforce-eager) was written to
    # /tmp/torchinductor_root here although TMPDIR pointed at the volume; the pods mount a volume at
    # /tmp itself, which this test cannot do, so the cache is pointed at the volume explicitly.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(volumes["tmp"] / "torchinductor"))
    yield volumes


def start(name: str, argv: list[str], port: int, volumes: dict[str, Path], ready: str) -> ServerProcess:
    if mount_namespaces():
        argv = read_only_root(argv, list(volumes.values()))
    else:
        warnings.warn("no mount namespace on this machine: the read-only root is not checked", stacklevel=2)
    return ServerProcess(name, argv, port, volumes["logs"], ready_path=ready).start()


def assert_clean(server: ServerProcess) -> None:
    """SIGTERM: exit status 0, and no traceback (nor a write refused by the read-only root) in its log."""
    status = server.stop(timeout=120)
    log = server.log_path.read_text(errors="replace")
    assert status == 0, server.log_tail()
    assert tracebacks(log) == [], server.log_tail(80)
    assert "Read-only file system" not in log, server.log_tail(80)


def push_on_the_admin_port_only(
    server: ServerProcess, admin: int, route: str, path: Path, version: int
) -> dict:
    """A weight push: refused (403) on the server's port, done on its admin port; the answer."""
    push = {"path": str(path), "version": version}
    refused = httpx.post(server.url + route, json=push, timeout=300)
    assert refused.status_code == 403 and "admin port" in refused.json()["error"]["message"], refused.text
    pushed = httpx.post(f"http://127.0.0.1:{admin}{route}", json=push, timeout=300)
    assert pushed.status_code == 200, pushed.text
    return pushed.json()


def test_a_rollout_server_and_a_critic_server_on_a_read_only_root_serve_then_exit_cleanly(
    tiny_models, pod_volumes
) -> None:
    """A critic server (the base deployment's) and a rollout server with an in-process critic (two
    engines in one process: the cpu-demo overlay's, also on a read-only root), started together."""
    critic_port, critic_admin, port, admin = free_port(), free_port(), free_port(), free_port()
    argv = espo_server_argv(
        "critic", "--model", str(tiny_models["critic"]), "--dtype", "float32", "--port", str(critic_port),
        "--admin-port", str(critic_admin), "--weights-dir", str(tiny_models["critic"].parent),
    )  # fmt: skip
    critic = start("critic-ro", argv, critic_port, pod_volumes, "/health")
    argv = espo_server_argv(
        "serve", "--model", str(tiny_models["policy"]), "--critic-model", str(tiny_models["critic"]),
        "--dtype", "float32", "--max-model-len", "512",
        "--port", str(port), "--admin-port", str(admin), "--weights-dir", str(tiny_models["policy"].parent),
    )  # fmt: skip
    rollout = start("rollout-ro", argv, port, pod_volumes, "/readyz")
    try:
        critic.wait_ready()
        values = httpx.post(critic.url + "/v1/values", json={"token_ids": [[5, 6, 7], [5, 6]]}, timeout=120)
        assert values.status_code == 200 and len(values.json()["values"]) == 2, values.text
        rollout.wait_ready()
        public, private = rollout.url, f"http://127.0.0.1:{admin}"
        body = {"prompts": [{"token_ids": [5, 6, 7]}], "n": 2, "max_tokens": 8, "stop_rule": "espo"}
        for url in (public, private):
            answer = httpx.post(url + "/v1/rollouts", json=body, timeout=300)
            assert answer.status_code == 200 and len(answer.json()["trajectories"]) == 2, answer.text
        pushed = push_on_the_admin_port_only(rollout, admin, "/v1/weights", tiny_models["policy"], 1)
        assert pushed["policy_version"] == 1
        assert httpx.get(public + "/metrics", timeout=30).status_code == 200
        pushed = push_on_the_admin_port_only(
            critic, critic_admin, "/v1/critic/weights", tiny_models["critic"], 2
        )
        assert pushed["critic_version"] == 2
        metrics = httpx.get(critic.url + "/metrics", timeout=30).text
        assert 'espo_engine="critic"' in metrics and "vllm:" in metrics  # its engine, for the scrape
        assert "espo_critic_version 2.0" in metrics
        assert 'espo_critic_weight_loads_total{outcome="ok"} 1.0' in metrics
        assert "espo_policy_version" not in metrics and "espo_inflight_trajectories" not in metrics
    except BaseException:
        rollout.stop()
        critic.stop()
        raise
    rollout.terminate()
    critic.terminate()  # both drain and shut down side by side
    assert_clean(rollout)
    assert_clean(critic)
