"""vLLM's `vllm:*` series of both engines of one process (policy and in-process critic) on /metrics.

vLLM's PrometheusStatLogger unregisters every `vllm:*` collector of the default registry when an
engine starts (vllm/v1/metrics/prometheus.py: unregister_vllm_metrics), so the engine started first
(the policy) lost its series; `metrics.ENGINE_SERIES` adopts each engine's collectors as it starts
and exports them all, labelled `espo_engine`.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from espo_server.metrics import ENGINE_LABEL, EngineSeries

EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def fake_engine(registry: CollectorRegistry, model: str) -> Counter:
    """What one vLLM engine's stat logger does at start-up: drop every vllm:* collector, add its own."""
    for collector in list(registry._collector_to_names):
        if getattr(collector, "_name", "").startswith("vllm:"):
            registry.unregister(collector)
    counter = Counter("vllm:generation_tokens", "tokens", ["model_name", "engine"], registry=registry)
    counter.labels(model_name=model, engine="0").inc(0)
    return counter


def test_engine_series_keeps_every_engine_and_labels_it():
    registry = CollectorRegistry()
    series = EngineSeries()
    registry.register(series)
    policy = fake_engine(registry, "policy-model")
    assert series.adopt("policy", registry) == 1
    critic = fake_engine(registry, "critic-model")  # would have unregistered the policy's counter
    assert series.adopt("critic", registry) == 1
    policy.labels(model_name="policy-model", engine="0").inc(5)
    critic.labels(model_name="critic-model", engine="0").inc(2)

    text = generate_latest(registry).decode()
    assert text.count("# TYPE vllm:generation_tokens_total counter") == 1  # one family, both engines
    got = {
        (labels[ENGINE_LABEL], labels["model_name"]): value
        for name, labels, value in samples(text)
        if name == "vllm:generation_tokens_total"
    }
    assert got == {("policy", "policy-model"): 5.0, ("critic", "critic-model"): 2.0}

    series.release("critic")
    names = {labels.get("model_name") for name, labels, _ in samples(generate_latest(registry).decode())}
    assert "critic-model" not in names and "policy-model" in names


def vllm_series(server) -> dict[tuple[str, str], float]:
    """(sample name, espo_engine) -> value summed over the other labels, for every vllm:* sample."""
    out: dict[tuple[str, str], float] = {}
    for name, labels, value in samples(httpx.get(server.url + "/metrics", timeout=10).text):
        if name.startswith("vllm:"):
            key = (name, labels.get(ENGINE_LABEL, "?"))
            out[key] = out.get(key, 0.0) + value
    return out


@pytest.mark.vllm
def test_both_engines_series_are_exported_and_move(inprocess_server, tiny_models):
    before = vllm_series(inprocess_server)
    assert {engine for _, engine in before} == {"policy", "critic"}, "every vllm:* sample has espo_engine"
    text = httpx.get(inprocess_server.url + "/metrics", timeout=10).text
    models = {
        labels[ENGINE_LABEL]: labels["model_name"]
        for name, labels, _ in samples(text)
        if name == "vllm:num_requests_running"
    }
    assert models == {"policy": str(tiny_models["policy"]), "critic": str(tiny_models["critic"])}

    body = {
        "prompts": [{"token_ids": [5, 6, 14, 7, 17]}],
        "n": 8,
        "max_tokens": 48,
        "seed": 5,
        "stop_rule": "espo",
        "state": EAGER,
        "rule_params": {"critic_stride": 1},
    }
    r = httpx.post(inprocess_server.url + "/v1/rollouts", json=body, timeout=300)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["critic_calls"] > 0  # the critic engine did work too

    after = vllm_series(inprocess_server)
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    generated = usage["generated_tokens"] + usage["discarded_tokens"]
    # Stopped samples are aborted: vLLM may count a token or two the rule never saw.
    assert generated <= moved[("vllm:generation_tokens_total", "policy")] <= generated + 2 * 8
    assert moved[("vllm:prompt_tokens_total", "policy")] >= 5
    assert moved[("vllm:prompt_tokens_total", "critic")] >= usage["critic_calls"] * 5  # each a prefix
    assert moved[("vllm:generation_tokens_total", "critic")] == 0  # a pooling engine generates nothing
