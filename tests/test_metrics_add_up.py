"""The exported series add up: a sum over a label is a meaningful total that equals what the
responses reported, and each figure of the tokens saved is its own counter. The request outcomes on
fakes (an error and a cancellation on cue), then everything after real calls and pushes on the
session's rollout server (tiny policy, remote critic), read from GET /metrics with
prometheus_client's exposition parser (tests/test_prometheus.py checks through a real Prometheus)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from espo_client import EspoClient
from espo_client.integrations import push_weights
from espo_client.protocol import Prompt, RolloutRequest
from espo_server import metrics
from espo_server.errors import InvalidRequest
from tests.fakes import FakeCritic, FakeEngine, GatedEngine, run, service
from tests.live_server import EAGER, PROMPT, post, rollouts, scrape
from tests.waiting import until


def snapshot(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in scrape(server)}


class Moved:
    """What the series moved by between two scrapes."""

    def __init__(self, before: dict, after: dict) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        def total(samples: dict) -> float:
            return sum(
                v for (n, have), v in samples.items() if n == name and set(labels.items()) <= set(have)
            )

        return total(self.after) - total(self.before)

    def by(self, name: str, label: str) -> dict[str, float]:
        values = {dict(have).get(label) for (n, have) in self.after if n == name}
        return {value: self(name, **{label: value}) for value in values if value is not None}


class BrokenEngine(FakeEngine):
    """An engine whose requests fail (the call ends with outcome="error")."""

    async def generate(self, request_id, prompt_token_ids, params):
        raise RuntimeError("engine failed")
        yield  # an async generator


def request_outcomes() -> dict[str, float]:
    return {o: metrics.REQUESTS.labels(outcome=o)._value.get() for o in ("ok", "error", "cancelled")}


def test_each_call_that_ran_is_one_outcome_and_one_wall_time():
    """Fakes: an answered, a failed and a cancelled call each count once, under their outcome, and
    once in the wall-time histogram; a replay and a refused call count nowhere."""

    def observed() -> float:
        (family,) = metrics.REQUEST_LATENCY.collect()
        return next(s.value for s in family.samples if s.name == "espo_rollout_request_seconds_count")

    body = {"prompts": [Prompt(token_ids=[5, 6, 7])], "n": 2, "max_tokens": 8, "stop_rule": "none"}
    before, seen = request_outcomes(), observed()

    ok = service(FakeEngine(length=5), FakeCritic())
    run(ok.rollouts(RolloutRequest(**body, request_id="once")))
    run(ok.rollouts(RolloutRequest(**body, request_id="once")))  # a replay: nothing ran
    with pytest.raises(InvalidRequest):  # refused before it ran
        ok.plan(RolloutRequest(**{**body, "max_tokens": 10_000}))
    with pytest.raises(RuntimeError, match="engine failed"):
        run(service(BrokenEngine(), FakeCritic()).rollouts(RolloutRequest(**body)))
    cancelled = service(GatedEngine(), FakeCritic())  # its samples wait: the call is running

    async def cancel() -> None:
        task = asyncio.create_task(cancelled.rollouts(RolloutRequest(**body)))
        await until(lambda: metrics.INFLIGHT._value.get() > 0, "the call started its samples")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel())
    after = request_outcomes()
    assert {o: after[o] - before[o] for o in after} == {"ok": 1, "error": 1, "cancelled": 1}
    assert observed() - seen == 3


@pytest.mark.vllm
def test_sums_over_labels_equal_what_the_calls_reported(rollout_server, critic_server, tiny_models):
    url = rollout_server.url
    before = snapshot(rollout_server)
    calls = [
        rollouts(rollout_server, prompts=[{"token_ids": PROMPT}, {"text": "2+2="}], n=6, max_tokens=40,
                 seed=31, stop_rule="espo", state=EAGER, rule_params={"critic_stride": 1, "min_tokens": 2}),
        rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=6, max_tokens=40, seed=32,
                 stop_rule="espo", shadow=True, state=EAGER, request_id="adds-up-1"),
        rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=3, max_tokens=8, seed=33,
                 stop_rule="none"),
    ]  # fmt: skip
    replay = rollouts(rollout_server, prompts=[{"token_ids": PROMPT}], n=6, max_tokens=40, seed=32,
                      stop_rule="espo", shadow=True, state=EAGER, request_id="adds-up-1")  # fmt: skip
    assert replay["trajectories"] == calls[1]["trajectories"]  # a replay: nothing ran
    assert post(rollout_server, {"prompts": [{"token_ids": PROMPT}], "n": 0}).status_code == 400
    moved = Moved(before, snapshot(rollout_server))
    usage = {key: sum(c["usage"][key] for c in calls) for key in calls[0]["usage"] if key != "deadline_hit"}
    assert usage["stopped"] > 0 and usage["shadow_stopped"] > 0, usage  # the check needs both

    # Requests: every call that ran counted once, under how it ended; replays and refusals not at all.
    outcomes = moved.by("espo_rollout_requests_total", "outcome")
    assert set(outcomes) == {"ok", "error", "cancelled"}, outcomes  # exported from the start
    assert sum(outcomes.values()) == outcomes["ok"] == len(calls)
    assert moved("espo_rollout_request_seconds_count") == len(calls)
    # Trajectories: the sum over end reasons (and rules) is the trajectories returned, each reason too.
    reasons = Counter(t["end_reason"] for c in calls for t in c["trajectories"])
    by_reason = moved.by("espo_trajectories_total", "end_reason")
    assert sum(by_reason.values()) == usage["trajectories"] == sum(reasons.values())
    assert {r: v for r, v in by_reason.items() if v} == dict(reasons)
    assert moved("espo_stopped_trajectories_total") == reasons["espo_stop"] == usage["stopped"]
    assert moved("espo_shadow_stops_total") == usage["shadow_stopped"]
    assert sum(moved.by("espo_generated_tokens_total", "rule").values()) == usage["generated_tokens"]
    # The tokens saved: one counter per figure, each the sum of its usage field.
    for figure in ("estimate", "upper_bound", "shadow"):
        assert moved(f"espo_tokens_saved_{figure}_total") == usage[f"tokens_saved_{figure}"], figure
    assert usage["tokens_saved_shadow"] > 0 and usage["tokens_saved_upper_bound"] > 0  # nonzero figures
    # Critic: the sum over outcomes is the queries; answered ones are the latency's count.
    critic = moved.by("espo_critic_calls_total", "outcome")
    assert sum(critic.values()) == usage["critic_calls"] > 0
    assert moved("espo_critic_latency_seconds_count") == usage["critic_calls"] - usage["critic_errors"]
    assert moved("espo_critic_tokens_total") == usage["critic_tokens"]
    assert moved("espo_critic_prefix_tokens_total") == usage["critic_prefix_tokens"]
    assert scrape_value(rollout_server, "espo_inflight_trajectories") == 0

    # The state: one gauge per field, equal to what the server reports.
    state = httpx.get(url + "/v1/espo/state", timeout=10).json()["state"]
    for field, value in state.items():
        assert scrape_value(rollout_server, f"espo_state_{field}") == pytest.approx(float(value)), field

    # Weight pushes (the same weights at the same versions: the session's server is unchanged),
    # timed from their arrival to the weights serving.
    info = httpx.get(url + "/v1/info", timeout=10).json()
    before = snapshot(rollout_server)
    pushes = {
        "policy": ("/v1/weights", tiny_models["policy"], info["policy_version"]),
        "critic": ("/v1/critic/weights", tiny_models["critic"], critic_version(critic_server)),
    }
    walls: dict[str, float] = {}
    loads: dict[str, float] = {}
    for model, (route, path, version) in pushes.items():
        started = time.perf_counter()
        r = httpx.post(url + route, json={"path": str(path), "version": version}, timeout=300)
        walls[model] = time.perf_counter() - started
        assert r.status_code == 200, r.text
        loads[model] = r.json()["load_time_s"]
    refused = httpx.post(url + "/v1/weights", json={"path": str(tiny_models["policy"].parent)}, timeout=60)
    assert refused.status_code == 400, refused.text  # no safetensors there: not a push that succeeded
    moved = Moved(before, snapshot(rollout_server))
    for model in pushes:
        assert moved("espo_weight_push_seconds_count", model=model, source="path") == 1, model
        seconds = moved("espo_weight_push_seconds_sum", model=model, source="path")
        assert loads[model] - 1e-3 <= seconds <= walls[model], (model, seconds, loads[model], walls[model])
    assert moved("espo_weight_loads_total", outcome="ok") == 1
    # The same policy uploaded (read from its directory on this side): timed under source="upload".
    before = snapshot(rollout_server)
    with EspoClient(base_url=url) as client:
        push_weights(client, tiny_models["policy"], info["policy_version"])
    moved = Moved(before, snapshot(rollout_server))
    assert moved("espo_weight_push_seconds_count", model="policy", source="upload") == 1
    assert moved("espo_weight_push_seconds_count", model="policy", source="path") == 0
    assert httpx.get(url + "/v1/info", timeout=10).json()["policy_version"] == info["policy_version"]
    assert critic_version(critic_server) == pushes["critic"][2]


def critic_version(critic_server) -> int:
    return httpx.get(critic_server.url + "/v1/info", timeout=10).json()["critic_version"]


def scrape_value(server, name: str) -> float:
    (value,) = [v for n, _, v in scrape(server) if n == name]
    return value


def test_a_push_to_espo_server_critic_is_timed_on_its_metrics(tmp_path):
    """`espo-server critic` (its app, on a stand-in critic): a push that succeeded is one observation of
    espo_weight_push_seconds{model="critic"} on its /metrics; one refused (403) is none."""
    from types import SimpleNamespace

    from espo_server.critic_server import build_critic_app

    class Critic:
        model, version, weights_dir, prefix_caching, block_size = "c", 0, "/c", True, 16
        llm = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 32))

        async def load_weights(self, path, version):
            await asyncio.sleep(0.05)  # a load that takes at least this long
            self.version = version
            return version, 0.05

    allowed = tmp_path / "weights"
    allowed.mkdir()
    app = build_critic_app(Critic(), weights_dir=[allowed])  # type: ignore[arg-type]

    async def go() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://critic") as http:
            before = (await http.get("/metrics")).text
            r = await http.post("/v1/critic/weights", json={"path": str(allowed), "version": 3})
            assert r.status_code == 200 and r.json()["critic_version"] == 3, r.text
            r = await http.post("/v1/critic/weights", json={"path": "/etc", "version": 4})
            assert r.status_code == 403, r.text
            return before, (await http.get("/metrics")).text

    before, after = run(go())

    def pushes(text: str) -> tuple[float, float]:
        from prometheus_client.parser import text_string_to_metric_families

        labels = {"model": "critic", "source": "path"}
        found = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("espo_weight_push_seconds_") and s.labels.items() >= labels.items()
        }
        count, seconds = "espo_weight_push_seconds_count", "espo_weight_push_seconds_sum"
        return found.get(count, 0.0), found.get(seconds, 0.0)

    (count0, sum0), (count1, sum1) = pushes(before), pushes(after)
    assert count1 - count0 == 1
    assert sum1 - sum0 >= 0.05  # the push's wall time holds its load
