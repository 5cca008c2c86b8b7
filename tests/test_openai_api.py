"""The OpenAI-compatible endpoints, through the real `openai` package, against a real server on loopback
(tiny policy + in-process critic, see conftest.inprocess_server), sync and streaming."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from espo_client.openai_protocol import EspoChoice
from espo_client.protocol import RolloutResponse
from espo_server.tiny_model import build_tokenizer

pytestmark = pytest.mark.vllm

MODEL = "tiny"  # --served-model-name of the fixture
EAGER = {"mu": 0.3, "var": 0.2, "beta": 10.0, "warm": True, "initialised": True, "batches": 5}
STOPPING = {"stop_rule": "regret_only", "state": EAGER, "rule_params": {"min_tokens": 2}}
"""ESPO extras that make the random tiny policy stop readily (no critic needed)."""


@pytest.fixture(scope="module")
def client(inprocess_server) -> OpenAI:
    return OpenAI(base_url=inprocess_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def espo_of(choice) -> EspoChoice:
    return EspoChoice.model_validate(choice.model_extra["espo"])


def test_models_lists_the_served_name(client):
    (model,) = client.models.list().data
    assert model.id == MODEL


def test_completions_text_and_token_prompts_with_espo_stops(client):
    out = client.completions.create(
        model=MODEL, prompt="7+5=", n=6, max_tokens=40, seed=3, logprobs=2, extra_body=STOPPING
    )
    assert out.object == "text_completion" and len(out.choices) == 6
    assert sorted(c.index for c in out.choices) == list(range(6))
    tokenizer = build_tokenizer()
    prompt_ids = tokenizer.encode("7+5=")
    reasons = set()
    for choice in out.choices:
        espo = espo_of(choice)
        reasons.add(choice.finish_reason)
        assert espo.prompt_token_ids == prompt_ids
        assert choice.text == tokenizer.decode(espo.token_ids, skip_special_tokens=True)
        assert choice.logprobs.token_logprobs == espo.logprobs
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in espo.token_ids]
        assert len(choice.logprobs.top_logprobs) == len(espo.token_ids)
        for step, lp in zip(choice.logprobs.top_logprobs, espo.logprobs, strict=True):
            assert len(step) <= 2 and max(step.values()) >= lp - 1e-6  # the top-1 is at least the sampled
        if choice.finish_reason == "espo_stop":
            assert espo.end_reason == "espo_stop" and espo.reward == -1.0
            assert espo.stop_step == len(espo.token_ids) - 1
        else:
            assert choice.finish_reason in ("stop", "length") and espo.stop_step is None
        assert espo.policy_version == 0
    assert "espo_stop" in reasons
    rollout = RolloutResponse.model_validate(out.model_extra["espo"])
    assert rollout.usage.stopped == sum(c.finish_reason == "espo_stop" for c in out.choices)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == sum(len(espo_of(c).token_ids) for c in out.choices)

    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 14], [7, 8]], n=2, max_tokens=8, seed=1)
    assert len(ids.choices) == 4
    for choice in ids.choices:
        espo = espo_of(choice)
        assert espo.prompt_token_ids == [[5, 6, 14], [7, 8]][espo.prompt_index]
        assert choice.index == espo.prompt_index * 2 + espo.sample_index
    assert ids.model_extra["espo"]["prompt_token_ids"] is None  # token-id prompts: nothing to tell


def test_completions_are_the_rollouts_of_the_same_request(client, inprocess_server):
    """Same seed, same sampling: the OpenAI route and POST /v1/rollouts return the same tokens."""
    out = client.completions.create(model=MODEL, prompt=[5, 6, 14, 7], n=3, max_tokens=20, seed=9)
    body = {"prompts": [{"token_ids": [5, 6, 14, 7]}], "n": 3, "max_tokens": 20, "seed": 9}
    direct = httpx.post(inprocess_server.url + "/v1/rollouts", json=body, timeout=300).json()
    by_index = {c.index: espo_of(c).token_ids for c in out.choices}
    assert by_index == {t["sample_index"]: t["token_ids"] for t in direct["trajectories"]}


def test_chat_uses_the_tokenizers_template(client):
    messages = [{"role": "system", "content": "3+"}, {"role": "user", "content": "4="}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, n=2, seed=4, logprobs=True, top_logprobs=3
    )
    assert out.object == "chat.completion" and len(out.choices) == 2
    tokenizer = build_tokenizer()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "3+4="  # tiny_model.CHAT_TEMPLATE: the contents, concatenated
    for choice in out.choices:
        espo = espo_of(choice)
        assert espo.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
        assert choice.message.role == "assistant"
        assert choice.message.content == tokenizer.decode(espo.token_ids, skip_special_tokens=True)
        content = choice.logprobs.content
        assert [c.logprob for c in content] == espo.logprobs
        assert all(len(c.top_logprobs) == 3 for c in content)
        assert all(c.bytes == list(c.token.encode()) for c in content)
    # max_tokens unset: the rest of the context
    out = client.chat.completions.create(
        model=MODEL, messages=messages, seed=4, extra_body={"ignore_eos": True}
    )
    assert len(espo_of(out.choices[0]).token_ids) == 512 - 4


def test_streaming_completions_and_chat(client):
    stream = client.completions.create(
        model=MODEL, prompt="1+2=", n=4, max_tokens=30, seed=2, stream=True,
        stream_options={"include_usage": True}, extra_body=STOPPING,
    )  # fmt: skip
    chunks = list(stream)
    choices = [c for chunk in chunks for c in chunk.choices]
    assert sorted(c.index for c in choices) == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length", "espo_stop") for c in choices)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == sum(
        len(espo_of(c).token_ids) for c in choices
    )
    rollout = RolloutResponse.model_validate(last.model_extra["espo"])
    assert rollout.usage.trajectories == 4 and rollout.trajectories == []
    assert rollout.usage.stopped == sum(c.finish_reason == "espo_stop" for c in choices)

    # the same request without streaming: the same choices
    same = client.completions.create(
        model=MODEL, prompt="1+2=", n=4, max_tokens=30, seed=2, extra_body=STOPPING
    )
    assert {c.index: c.text for c in same.choices} == {c.index: c.text for c in choices}

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "5+5="}], n=3, max_tokens=10, seed=1, stream=True
    )
    chunks = list(chat)
    deltas = [c for chunk in chunks for c in chunk.choices]
    assert sorted(d.index for d in deltas) == [0, 1, 2]
    for delta in deltas:
        espo = EspoChoice.model_validate(delta.model_extra["espo"])
        assert delta.delta.role == "assistant"
        assert delta.delta.content == build_tokenizer().decode(espo.token_ids, skip_special_tokens=True)
    assert chunks[-1].choices == [] and chunks[-1].usage is None  # no include_usage


def test_stop_strings_end_choices_and_are_cut_from_the_text(client):
    free = client.completions.create(model=MODEL, prompt="7+5=", n=8, max_tokens=40, seed=11)
    texts = [c.text for c in free.choices]
    stop = next(ch for ch in "abcdefghij" if sum(ch in t for t in texts) >= 2)
    out = client.completions.create(model=MODEL, prompt="7+5=", n=8, max_tokens=40, seed=11, stop=[stop])
    stopped = 0
    for choice, before in zip(
        sorted(out.choices, key=lambda c: c.index), sorted(free.choices, key=lambda c: c.index), strict=True
    ):
        espo = espo_of(choice)
        assert stop not in choice.text
        if stop in before.text:  # same seed: the same tokens until the stop string appears
            stopped += 1
            assert choice.finish_reason == "stop" and espo.end_reason == "eos"
            assert choice.text == before.text[: before.text.index(stop)]
            decoded = build_tokenizer().decode(espo.token_ids, skip_special_tokens=True)
            assert decoded.endswith(stop)  # the token that completed it is kept in token_ids
        else:
            assert choice.text == before.text
    assert stopped >= 2


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"n": 0}, 400, "n"),
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"prompt": [[5, 6, 10_000]]}, 400, "prompt"),
        ({"prompt": [[5, 6], [5, 99_999]]}, 400, "prompt[1]"),
        ({"prompt": ["7+", [5, 6]]}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"model": "gpt-4"}, 404, "model"),
        ({"temperature": -1}, 400, "temperature"),
        ({"temperature": 2.5}, 400, "temperature"),  # vLLM's range is [0, 2]: a 400, not its 503
        ({"seed": -1}, 400, "seed"),
        ({"seed": 2**63}, 400, "seed"),
        ({"logprobs": 50}, 400, "logprobs"),
        ({"echo": True}, 400, "echo"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"extra_body": {"rule_params": {"tau": 2}}}, 400, "rule_params.tau"),
        ({"extra_body": {"stop_rule": "sometimes"}}, 400, "stop_rule"),
        ({"extra_body": {"tools": []}}, 400, "tools"),
        ({"extra_body": {"answer": ["1", "2"]}}, 400, "answer"),
        ({"stop": [""]}, 400, "stop"),
    ],
)
def test_bad_completions_are_4xx_naming_the_field(client, kwargs, status, param):
    request = {"model": MODEL, "prompt": "7+5=", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param, caught.value.body
    # and the server keeps serving
    assert client.completions.create(model=MODEL, prompt="1+", max_tokens=2).choices


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 99, "logprobs": True}, "top_logprobs"),
        ({"temperature": 5}, "temperature"),
        ({"seed": -3}, "seed"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(client, kwargs, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "7+"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.body["param"] == param, caught.value.body


def test_a_retry_with_the_same_request_id_replays_the_choices(client, inprocess_server):
    """A known request_id is answered from the idempotency cache: the same choices, logprobs and
    usage as the first answer (its replay once ended in a 503 IndexError: no prompt ids), also
    streamed, and the seed's largest value wraps instead of overflowing the engine's generator."""
    chat = {
        "model": MODEL, "messages": [{"role": "user", "content": "4+4="}], "n": 2, "max_tokens": 6,
        "logprobs": True, "top_logprobs": 2, "seed": 2**63 - 1,
        "extra_body": {"request_id": "chat-retry-1"},
    }  # fmt: skip
    first = client.chat.completions.create(**chat)
    again = client.chat.completions.create(**chat)
    assert again.model_dump(exclude={"created"}) == first.model_dump(exclude={"created"})
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 0
    streamed = [c for chunk in client.chat.completions.create(**chat, stream=True) for c in chunk.choices]
    assert {c.index: c.delta.content for c in streamed} == {c.index: c.message.content for c in first.choices}
    completion = {"model": MODEL, "prompt": ["1+", "2+"], "max_tokens": 4, "logprobs": 1, "seed": 5,
                  "extra_body": {"request_id": "completion-retry-1"}}  # fmt: skip
    first = client.completions.create(**completion)
    again = client.completions.create(**completion)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert [espo_of(c).prompt_token_ids for c in sorted(again.choices, key=lambda c: c.index)] == [
        build_tokenizer().encode(p) for p in ("1+", "2+")
    ]
    assert again.usage == first.usage


def test_chat_without_a_template_is_400(inprocess_server, monkeypatch):
    """A tokenizer without a chat template (and no --chat-template): 400 naming messages."""
    from espo_server.openai_api import OpenAIServing

    class Tokenizer:
        chat_template = None

    class Engine:
        tokenizer = Tokenizer()
        max_model_len = 512

    class Service:
        engine = Engine()

    from espo_client.openai_protocol import ChatCompletionRequest
    from espo_server.config import ServerConfig
    from espo_server.errors import InvalidRequest

    serving = OpenAIServing(Service(), ServerConfig(served_model_name="m"))  # type: ignore[arg-type]
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest) as caught:
        serving.chat_call(body)
    assert caught.value.param == "messages" and "chat template" in caught.value.message


def test_logprobs_match_the_rollout_logprobs_numerically(client, inprocess_server):
    out = client.completions.create(
        model=MODEL, prompt=[5, 6, 14], max_tokens=16, seed=21, logprobs=1, extra_body={"include": ["regret"]}
    )
    (choice,) = out.choices
    espo = espo_of(choice)
    top1 = [max(step.values()) for step in choice.logprobs.top_logprobs]
    regret = np.array(top1) - np.array(choice.logprobs.token_logprobs)
    assert np.allclose(regret, espo.traces.regret, atol=1e-6)  # g_t = max log pi - log pi(a_t)
