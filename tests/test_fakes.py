"""The fakes implement what they stand in for: the scripted `FakeEngine` and the real `PolicyEngine`
against the one Protocol the service needs from a policy engine (`espo_server.engine.Engine`)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from espo_server.engine import Engine, PolicyEngine
from tests.fakes import FakeEngine, FakeTokenizer

METHODS = ["generate", "abort", "reload_weights", "check_health", "fail_streams"]


def stub_llm() -> SimpleNamespace:
    """Just what PolicyEngine reads of vLLM's AsyncLLM when it is built."""
    config = SimpleNamespace(get_vocab_size=lambda: 64, max_model_len=128)
    return SimpleNamespace(model_config=config, errored=False)


def test_the_protocol_names_every_method_it_declares():
    declared = {n for n, value in vars(Engine).items() if inspect.isfunction(value) and not n.startswith("_")}
    assert declared == set(METHODS)


@pytest.mark.parametrize(
    "engine", [FakeEngine(), PolicyEngine(stub_llm(), "m", FakeTokenizer())], ids=lambda e: type(e).__name__
)
def test_the_fake_and_the_real_engine_have_every_member_of_the_protocol(engine):
    assert isinstance(engine, Engine)  # every attribute and method is there


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("cls", [FakeEngine, PolicyEngine])
def test_their_methods_have_the_protocols_signatures(cls, name):
    want, got = getattr(Engine, name), getattr(cls, name)
    assert str(inspect.signature(got)) == str(inspect.signature(want))
    if name == "generate":  # an async iterator: both are async generators
        assert inspect.isasyncgenfunction(got)
    elif name == "fail_streams":  # called from the watchdog, synchronously
        assert not inspect.iscoroutinefunction(got) and not inspect.iscoroutinefunction(want)
    else:
        assert inspect.iscoroutinefunction(got) and inspect.iscoroutinefunction(want)
