"""The engines give their free C heap back (espo_server/heap_trim.py): the vLLM plugin is installed,
runs in the engine processes our servers spawn, and trims."""

from __future__ import annotations

import re
import time
from importlib.metadata import entry_points

import pytest

from espo_server import heap_trim


def test_the_plugin_is_installed_where_vllm_looks_for_it() -> None:
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "espo_heap_trim"]
    assert plugin.load() is heap_trim.register


def test_register_without_the_setting_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock `vllm serve` and the benches' own AsyncLLM load the plugin too: without
    ESPO_MALLOC_TRIM_S (or with 0, or with garbage) it leaves them alone."""
    for value in (None, "0", "soon"):
        if value is None:
            monkeypatch.delenv(heap_trim.ENV, raising=False)
        else:
            monkeypatch.setenv(heap_trim.ENV, value)
        heap_trim.register()
        assert heap_trim._started is None


def test_the_thread_trims_every_interval() -> None:
    before = heap_trim.trims
    thread = heap_trim.start(0.01)
    try:
        assert heap_trim.start(5.0) is thread  # once per process
        deadline = time.monotonic() + 60
        while heap_trim.trims < before + 3:
            assert time.monotonic() < deadline, "no trim in 60 s"
            time.sleep(0.01)
        assert thread.daemon and thread.is_alive()
    finally:
        heap_trim.stop()
    assert not thread.is_alive() and heap_trim._started is None


@pytest.mark.vllm
def test_our_servers_engine_processes_trim(rollout_server, critic_server) -> None:
    """The rollout server (`serve`) and the critic server (`critic`) set ESPO_MALLOC_TRIM_S (default
    60 s) for the engine processes they spawn; vLLM loads the plugin there."""
    for server in (rollout_server, critic_server):
        log = server.log_path.read_text(errors="replace")
        engine = re.findall(r"\(EngineCore pid=(\d+)\).*free C heap returned to the system every 60 s", log)
        assert engine, server.log_tail(80)
