"""A real Prometheus (Debian's `prometheus`, installed by `make test`) on loopback scrapes a running
rollout server (tiny policy + in-process critic) with deploy/prometheus/rules.yaml loaded; PromQL
over the scraped series must give the tokens saved, the stop rate and the critic latency that the
responses reported."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from espo_server.process import free_port

pytestmark = pytest.mark.vllm

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules.yaml"
EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}


def tool(name: str) -> str:
    """A tool `make test` installs: on PATH or beside this Python (the venv's bin)."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is not installed: `make test` installs it (Debian package prometheus)"
    return path


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str, at: float | None = None) -> float:
        result = self.query(promql, at)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus(inprocess_server, tmp_path_factory) -> Iterator[Prometheus]:
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "espo-server",  # what rules.yaml and the dashboard select on
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{inprocess_server.port}"],
                        "labels": {"namespace": "test", "pod": "espo-server-0"},
                    }
                ],
            }
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(root / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_for(
            lambda: httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200, 60, "Prometheus ready"
        )
        wait_for(lambda: prom.query('up{job="espo-server"} == 1') != [], 60, "the first scrape")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def direct(server, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def scraped_up_to_date(prom: Prometheus, server) -> float:
    """Wait until Prometheus has scraped the server's current state; return the time of that query."""
    want = direct(server, "espo_rollout_requests_total", outcome="ok")
    holder: dict[str, float] = {}

    def caught_up() -> bool:
        at = time.time()
        got = prom.query('sum(espo_rollout_requests_total{job="espo-server", outcome="ok"})', at)
        holder["at"] = at
        return bool(got) and float(got[0]["value"][1]) == want

    wait_for(caught_up, 30, "a scrape of the server's current state")
    return holder["at"]


def test_promql_over_a_real_scrape_matches_what_responses_reported(prometheus, inprocess_server):
    def call(**extra) -> dict:
        body = {
            "prompts": [{"token_ids": [5, 6, 14, 7, 17]}, {"text": "3+4="}],
            "n": 8,
            "max_tokens": 40,
            "stop_rule": "espo",
            "state": EAGER,
            "rule_params": {"critic_stride": 1, "min_tokens": 2},
            **extra,
        }
        r = httpx.post(inprocess_server.url + "/v1/rollouts", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    call(seed=100)  # every series of the check exists before it starts
    t0 = scraped_up_to_date(prometheus, inprocess_server)
    usages = [call(seed=seed) for seed in (1, 2, 3)]
    t1 = scraped_up_to_date(prometheus, inprocess_server)
    offset = f"{math.ceil((t1 - t0) * 1000)}ms"

    def moved(selector: str) -> float:
        """How much sum(selector) grew between t0 and t1, in PromQL."""
        return prometheus.value(f"sum({selector}) - sum({selector} offset {offset})", t1)

    def total(key: str) -> float:
        return sum(u[key] for u in usages)

    assert total("stopped") > 0 and total("critic_calls") > 0, "the check needs stops and critic queries"
    # tokens saved
    assert moved('espo_tokens_saved_estimate_total{job="espo-server"}') == total("tokens_saved_estimate")
    assert moved("espo_tokens_saved_upper_bound_total") == total("tokens_saved_upper_bound")
    assert moved('espo_generated_tokens_total{rule="espo"}') == total("generated_tokens")

    # stop rate, as one PromQL expression
    def delta(selector: str) -> str:
        return f"(sum({selector}) - sum({selector} offset {offset}))"

    stopped, ended = (
        delta('espo_stopped_trajectories_total{rule="espo"}'),
        delta('espo_trajectories_total{rule="espo"}'),
    )
    stop_rate = prometheus.value(f"{stopped} / {ended}", t1)
    assert stop_rate == pytest.approx(total("stopped") / total("trajectories"), abs=1e-12)
    # critic latency: every answered query observed once; its summed latency is within the calls'
    answered = total("critic_calls") - total("critic_errors")
    assert moved("espo_critic_latency_seconds_count") == answered
    observed = moved("espo_critic_latency_seconds_sum")
    assert 0.5 * total("critic_time_s") <= observed <= total("critic_time_s") + 1e-3
    p95 = prometheus.value(
        "histogram_quantile(0.95, sum by (le) (rate(espo_critic_latency_seconds_bucket[1m])))", t1
    )
    assert 0 < p95 <= 5.0
    # vLLM's series of both engines, told apart by espo_engine
    engines = {
        r["metric"]["espo_engine"]
        for r in prometheus.query("sum by (espo_engine) (vllm:prompt_tokens_total)")
    }
    assert engines == {"policy", "critic"}
    assert moved('vllm:prompt_tokens_total{espo_engine="critic"}') > 0

    # deploy/prometheus/rules.yaml's recording rules evaluate on the real series
    def recorded(name: str, matchers: str = "") -> list[dict]:
        return prometheus.query(f'{name}{{job="espo-server", namespace="test"{matchers}}}')

    wait_for(
        lambda: recorded("espo:stop_rate:ratio_rate5m", ', rule="espo"') != [], 30, "the recording rules"
    )
    rate = float(recorded("espo:stop_rate:ratio_rate5m", ', rule="espo"')[0]["value"][1])
    assert 0 < rate <= 1
    assert recorded("espo:critic_latency_seconds:p95_5m") and recorded("espo:token_savings:ratio_rate5m")
    cost = "espo:critic_tokens_per_generated_token:ratio_rate5m"
    hits = "espo:critic_prefix_cache_hits:ratio_rate5m"
    wait_for(lambda: recorded(cost) != [] and recorded(hits) != [], 30, "the critic cost rules")
    assert float(recorded(cost)[0]["value"][1]) > 0  # the critic computed tokens
    assert 0 <= float(recorded(hits)[0]["value"][1]) < 1
