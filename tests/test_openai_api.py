"""The OpenAI-compatible endpoints, through the real `openai` package, against a real server on loopback
(tiny policy + in-process critic, see conftest.inprocess_server), sync and streaming."""

from __future__ import annotations

import time

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
        assert espo.prompt_token_ids == prompt_ids
        assert choice.text == tokenizer.decode(espo.token_ids, skip_special_tokens=True)
        assert choice.logprobs.token_logprobs == espo.logprobs
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in espo.token_ids]
        assert len(choice.logprobs.top_logprobs) == len(espo.token_ids)
        for step, lp in zip(choice.logprobs.top_logprobs, espo.logprobs, strict=True):
            assert len(step) <= 3 and max(step.values()) >= lp - 1e-6  # sampled + top 2 (vLLM: up to N+1)
        stop_reason = choice.model_extra["stop_reason"]
        if stop_reason == "espo_stop":  # finish_reason stays in the standard set
            assert choice.finish_reason == "stop"
            assert espo.end_reason == "espo_stop" and espo.reward == -1.0
            assert espo.stop_step == len(espo.token_ids) - 1
        else:
            assert choice.finish_reason in ("stop", "length") and espo.stop_step is None
            assert stop_reason is None  # EOS or max_tokens
        reasons.add(stop_reason)
        assert espo.policy_version == 0
    assert "espo_stop" in reasons
    rollout = RolloutResponse.model_validate(out.model_extra["espo"])
    assert rollout.usage.stopped == sum(c.model_extra["stop_reason"] == "espo_stop" for c in out.choices)
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


def by_choice(chunks) -> dict[int, list]:
    """A stream's choice chunks, per choice index, in the order they came."""
    out: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            out.setdefault(choice.index, []).append(choice)
    return out


def test_streaming_completions_and_chat(client):
    """Tokens are streamed as they are sampled (regret_only decides without a critic: nothing is held
    back); each choice ends with one chunk carrying its finish and its espo object."""
    stream = client.completions.create(
        model=MODEL, prompt="1+2=", n=4, max_tokens=30, seed=2, stream=True,
        stream_options={"include_usage": True}, extra_body=STOPPING,
    )  # fmt: skip
    chunks = list(stream)
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1, 2, 3]
    for parts in choices.values():
        ends = [p for p in parts if p.finish_reason is not None]
        assert ends == [parts[-1]] and parts[-1].finish_reason in ("stop", "length")
        assert all(p.model_extra.get("espo") is None for p in parts[:-1])
    assert any(len(parts) > 1 for parts in choices.values())  # sent as sampled, not whole at the end
    ends = [parts[-1] for parts in choices.values()]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == sum(len(espo_of(c).token_ids) for c in ends)
    rollout = RolloutResponse.model_validate(last.model_extra["espo"])
    assert rollout.usage.trajectories == 4 and rollout.trajectories == []
    assert rollout.usage.stopped == sum(c.model_extra["stop_reason"] == "espo_stop" for c in ends) > 0

    # the same request without streaming: the same choices
    same = client.completions.create(
        model=MODEL, prompt="1+2=", n=4, max_tokens=30, seed=2, extra_body=STOPPING
    )
    texts = {i: "".join(p.text for p in parts) for i, parts in choices.items()}
    assert {c.index: c.text for c in same.choices} == texts

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "5+5="}], n=3, max_tokens=10, seed=1, stream=True
    )
    chunks = list(chat)
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1, 2]
    for parts in choices.values():
        espo = EspoChoice.model_validate(parts[-1].model_extra["espo"])
        assert [p.delta.role for p in parts] == ["assistant"] + [None] * (len(parts) - 1)
        text = "".join(p.delta.content for p in parts)
        assert text == build_tokenizer().decode(espo.token_ids, skip_special_tokens=True)
    assert chunks[-1].choices == [] and chunks[-1].usage is None  # no include_usage


def test_a_streamed_choice_is_the_non_streamed_one_sent_in_parts(client):
    """espo with the in-process critic and a state that asks it: for the same seed, a stream's
    deltas put together (text, token ids, logprobs) are the non-streamed choice; whatever the critic
    cut (discarded tokens) was never sent."""
    body = dict(
        model=MODEL, prompt=["1+2=", "7+5+9="], n=4, max_tokens=40, seed=7, logprobs=1,
        extra_body={"stop_rule": "espo", "state": EAGER, "rule_params": {"min_tokens": 2, "critic_stride": 3},
                    "return_token_ids": True, "include": ["values"]},
    )  # fmt: skip
    whole = {c.index: c for c in client.completions.create(**body).choices}
    streamed = by_choice(client.completions.create(**body, stream=True))
    assert sorted(streamed) == sorted(whole) == list(range(8))
    for index, parts in streamed.items():
        choice, espo = whole[index], espo_of(whole[index])
        assert "".join(p.text for p in parts) == choice.text
        assert [t for p in parts for t in p.token_ids] == choice.token_ids == espo.token_ids
        assert [t for p in parts for t in p.logprobs.tokens] == choice.logprobs.tokens
        assert [lp for p in parts for lp in p.logprobs.token_logprobs] == choice.logprobs.token_logprobs
        assert [o for p in parts for o in p.logprobs.text_offset] == choice.logprobs.text_offset
        assert (parts[-1].finish_reason, parts[-1].model_extra["stop_reason"]) == (
            choice.finish_reason, choice.model_extra["stop_reason"]
        )  # fmt: skip
        assert espo_of(parts[-1]).token_ids == espo.token_ids  # discarded_tokens vary with the timing
    asked = [v for c in whole.values() for v in espo_of(c).traces.values if v is not None]
    assert asked  # the critic was asked: tokens were held back while it answered


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
        ({"frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ({"extra_body": {"use_beam_search": True}}, 400, "use_beam_search"),
        ({"extra_body": {"prompt_embeds": "abc"}}, 400, "prompt_embeds"),
        ({"extra_body": {"top_k": 1000}}, 400, "top_k"),
        ({"extra_body": {"min_tokens": 5}}, 400, "min_tokens"),  # above max_tokens=4
        ({"extra_body": {"min_p": 1.5}}, 400, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, 400, "repetition_penalty"),
        ({"extra_body": {"allowed_token_ids": [5, 9999]}}, 400, "allowed_token_ids"),
        ({"logit_bias": {"9999": 5}}, 400, "logit_bias"),
        ({"extra_body": {"bad_words": [""]}}, 400, "bad_words[0]"),
        ({"best_of": 3}, 400, "best_of"),
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
        ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}}, "tools"),
        (
            {"extra_body": {"add_generation_prompt": True, "continue_final_message": True}},
            "continue_final_message",
        ),
        ({"extra_body": {"chat_template": "{{ 1 }}"}}, "chat_template"),
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


# ----------------------------------------------------------------------------- vLLM's dialect


def test_vllm_sampling_fields_reach_the_engine_and_logprobs_stay_raw(client):
    """top_k, allowed_token_ids, logit_bias, bad_words, min_tokens and the penalties change what is
    sampled (each checked against the same seed without it), never the logprobs: those stay raw."""
    base = {"model": MODEL, "prompt": [5, 6, 14], "n": 4, "max_tokens": 24, "seed": 13, "logprobs": 1}
    free = client.completions.create(**base)
    greedy = client.completions.create(**{**base, "temperature": 0})
    top1 = client.completions.create(**base, extra_body={"top_k": 1})
    assert [espo_of(c).token_ids for c in top1.choices] == [espo_of(c).token_ids for c in greedy.choices]
    # raw: the greedy token's own probability under the model, not the 1.0 top_k=1 sampled it with
    assert min(lp for c in top1.choices for lp in c.logprobs.token_logprobs) < -0.01
    for c in top1.choices:  # the sampled token is the most likely one: its logprob is the step's top
        assert all(
            max(step.values()) == lp
            for step, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs, strict=True)
        )

    allowed = client.completions.create(**base, extra_body={"allowed_token_ids": [5, 6]})
    for c in allowed.choices:
        espo = espo_of(c)
        assert set(espo.token_ids) <= {5, 6} and c.finish_reason == "length"  # EOS is not allowed
        assert all(lp < -0.01 for lp in espo.logprobs)  # raw: not renormalised over the two

    biased = client.completions.create(**base, logit_bias={"7": 100})
    assert all(set(espo_of(c).token_ids) == {7} for c in biased.choices)
    assert max(lp for c in biased.choices for lp in espo_of(c).logprobs) < -0.01

    texts = "".join(c.text for c in free.choices)
    word = next(ch for ch in "0123456789abcdefghij" if ch in texts)
    banned = client.completions.create(**base, extra_body={"bad_words": [word]})
    assert all(word not in c.text for c in banned.choices)

    long = client.completions.create(**{**base, "n": 8, "max_tokens": 40})
    assert any(len(espo_of(c).token_ids) < 40 for c in long.choices)  # EOS ends some early
    floor = client.completions.create(**{**base, "n": 8, "max_tokens": 40}, extra_body={"min_tokens": 40})
    assert all(len(espo_of(c).token_ids) == 40 for c in floor.choices)

    for penalty in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        # the random tiny policy's logits are all near 0: dividing or multiplying them by 2 moves
        # little, so only a large repetition penalty changes a sample
        {"extra_body": {"repetition_penalty": 100.0}},
    ):
        other = client.completions.create(**base, **penalty)
        assert [espo_of(c).token_ids for c in other.choices] != [espo_of(c).token_ids for c in free.choices]


def test_model_is_optional_and_token_ids_come_back_on_request(client, inprocess_server):
    body = {"prompt": [[5, 6, 14], [7, 8]], "max_tokens": 6, "n": 2, "seed": 3, "logprobs": 2,
            "return_token_ids": True, "return_tokens_as_token_ids": True}  # fmt: skip
    out = httpx.post(inprocess_server.url + "/v1/completions", json=body, timeout=300).json()
    assert out["model"] == MODEL
    for choice in out["choices"]:
        espo = choice["espo"]
        assert choice["token_ids"] == espo["token_ids"]
        assert choice["prompt_token_ids"] == [[5, 6, 14], [7, 8]][espo["prompt_index"]]
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in espo["token_ids"]]
        for step, token in zip(choice["logprobs"]["top_logprobs"], espo["token_ids"], strict=True):
            assert f"token_id:{token}" in step and 2 <= len(step) <= 3  # the sampled token and the top 2
    chat = {"messages": [{"role": "user", "content": "4+4="}], "max_tokens": 5, "return_token_ids": True,
            "return_prompt_text": True, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    out = httpx.post(inprocess_server.url + "/v1/chat/completions", json=chat, timeout=300).json()
    assert out["prompt_token_ids"] == build_tokenizer().encode("4+4=") and out["prompt_text"] == "4+4="
    (choice,) = out["choices"]
    assert choice["token_ids"] == choice["espo"]["token_ids"]
    assert all(len(c["top_logprobs"]) == 2 for c in choice["logprobs"]["content"])
    # null means unset, as in vLLM
    out = httpx.post(inprocess_server.url + "/v1/completions",
                     json={"prompt": "1+", "max_tokens": None, "n": None, "top_k": None},
                     timeout=300)  # fmt: skip
    assert out.status_code == 200 and len(out.json()["choices"]) == 1


def test_stop_tokens_and_special_tokens_as_vllm_words_them(client):
    """A stop token id is the stop_reason and is left out of the text (kept with
    include_stop_str_in_output); EOS is null; skip_special_tokens=false shows it."""
    base = {"model": MODEL, "prompt": [5, 6, 14], "n": 8, "max_tokens": 40, "seed": 5}
    free = client.completions.create(**base)
    ids = [espo_of(c).token_ids for c in sorted(free.choices, key=lambda c: c.index)]
    token = next(t for t in range(10, 30) if sum(t in s for s in ids) >= 2)
    tokenizer = build_tokenizer()
    for include in (False, True):
        out = client.completions.create(
            **base, extra_body={"stop_token_ids": [token], "include_stop_str_in_output": include}
        )
        hits = 0
        for choice in out.choices:
            espo = espo_of(choice)
            if espo.token_ids and espo.token_ids[-1] == token and choice.finish_reason == "stop":
                hits += 1
                assert choice.model_extra["stop_reason"] == token
                kept = espo.token_ids if include else espo.token_ids[:-1]
                assert choice.text == tokenizer.decode(kept, skip_special_tokens=True)
        assert hits >= 2
    eos = [c for c in free.choices if espo_of(c).end_reason == "eos"]
    assert eos and all(c.model_extra["stop_reason"] is None for c in eos)
    shown = client.completions.create(
        **base, extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True}
    )
    assert any(c.text.endswith("</s>") for c in shown.choices)
    assert all(not c.text.endswith("</s>") for c in client.completions.create(**base).choices)


def test_vllm_serving_routes(inprocess_server):
    url = inprocess_server.url
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.content == b""
    version = httpx.get(url + "/version", timeout=30).json()
    assert version["version"] == __import__("vllm").__version__ and version["espo_server"]
    tokenizer = build_tokenizer()
    out = httpx.post(url + "/tokenize", json={"prompt": "7+5=", "return_token_strs": True}, timeout=30).json()
    assert out == {"count": 4, "max_model_len": 512, "tokens": tokenizer.encode("7+5="),
                   "token_strs": ["7", "+", "5", "="]}  # fmt: skip
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "3+"}, {"role": "user", "content": "4="}],
    }
    assert httpx.post(url + "/tokenize", json=chat, timeout=30).json()["tokens"] == tokenizer.encode("3+4=")
    back = httpx.post(url + "/detokenize", json={"tokens": [*tokenizer.encode("7+5="), 2]}, timeout=30).json()
    assert back == {"prompt": "7+5=</s>"}
    for path, body, param in (
        ("/detokenize", {"tokens": [99_999]}, "tokens"),
        ("/tokenize", {"prompt": "1", "model": "gpt-4"}, "model"),
    ):
        answer = httpx.post(url + path, json=body, timeout=30)
        assert answer.status_code in (400, 404) and answer.json()["error"]["param"] == param


def test_a_dropped_stream_aborts_its_samples(client, inprocess_server):
    """An OpenAI stream whose client goes away mid-call: its samples are aborted, the server serves on."""
    from tests.live_server import metric

    before = metric(inprocess_server, "espo_rollout_requests_total", outcome="cancelled")
    body = {"model": MODEL, "prompt": [5, 6], "n": 16, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", inprocess_server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200  # then close it before any choice is final
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            metric(inprocess_server, "espo_rollout_requests_total", outcome="cancelled") > before
            and metric(inprocess_server, "espo_inflight_trajectories") == 0
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the stream's samples were still running after its client went away")
    assert client.completions.create(model=MODEL, prompt="1+", max_tokens=2).choices


def test_vllms_own_benchmark_client_runs_unchanged(inprocess_server, tiny_models, tmp_path):
    """`vllm bench serve` (vllm.benchmarks.serve) with --backend openai and openai-chat: every request
    through (it sends repetition_penalty, stream_options, ignore_eos and calls /tokenize)."""
    from bench import vllm_bench

    for backend in vllm_bench.BACKENDS:
        result = vllm_bench.run_client(
            inprocess_server.url, MODEL, str(tiny_models["policy"]), backend,
            tmp_path / f"{backend}.json", num_prompts=6, input_len=12, output_len=10, timeout=600,
        )  # fmt: skip
        assert result["completed"] == 6 and result["failed"] == 0, result["errors"]
        assert result["total_output_tokens"] == 6 * 10  # EOS ignored: every token asked for
        assert result["mean_ttft_ms"] > 0
        assert result["mean_itl_ms"] > 0  # tokens are streamed as sampled, not whole choices
