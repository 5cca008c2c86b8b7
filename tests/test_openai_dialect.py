"""vLLM's dialect on the OpenAI routes, the pure parts: request models, choice text and stop_reason as
vLLM words them, logprob shapes (no engine; the routes themselves: tests/test_openai_api.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from espo_client.openai_protocol import NOT_IMPLEMENTED, ChatCompletionRequest, CompletionRequest
from espo_client.protocol import RolloutRequest, Sampling, Traces, Trajectory
from espo_server.engine import GenerationParams
from espo_server.events import TokenDelta
from espo_server.openai_choices import ChoiceText, chat_logprobs, completion_logprobs
from espo_server.tiny_model import EOS_ID, build_tokenizer

TOKENIZER = build_tokenizer()


def traj(text: str, end_reason: str = "eos", eos: bool = False, **kw) -> Trajectory:
    ids = TOKENIZER.encode(text) + ([EOS_ID] if eos else [])
    return Trajectory(
        prompt_index=0, sample_index=0, token_ids=ids, logprobs=[-0.5] * len(ids), end_reason=end_reason,
        policy_version=0, **kw,
    )  # fmt: skip


def test_vllm_requests_validate_as_vllm_does():
    """vLLM's bench client's body, nulls as unset, no model, neutral values of what is not implemented."""
    bench = {"model": "tiny", "prompt": "1+", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None,
             "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    assert CompletionRequest.model_validate(bench).repetition_penalty == 1.0
    nulls = CompletionRequest.model_validate({"prompt": [1, 2], "n": None, "max_tokens": None, "top_k": None})
    assert (nulls.model, nulls.n, nulls.max_tokens, nulls.top_k) == (None, 1, 16, 0)
    neutral = {
        name: values[0] for name, values in NOT_IMPLEMENTED.items() if name in CompletionRequest.model_fields
    }
    CompletionRequest.model_validate({"prompt": "1", **neutral})
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "1+"}]}],
         "max_completion_tokens": 4, "tools": None, "tool_choice": "none", "top_k": 5, "min_p": 0.1,
         "logit_bias": {"7": -100}}
    )  # fmt: skip
    assert chat.logit_bias == {7: -100.0}
    for bad in ({"prompt_embeds": "x"}, {"top_k": -2}, {"presence_penalty": 3}, {"logit_bias": {"7": 101}}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "1", **bad})


def test_sampling_is_one_set_of_fields_from_every_request_to_the_engine():
    """RolloutRequest and the OpenAI requests share protocol.Sampling (vLLM's settings included);
    GenerationParams.of takes every field of it to the engine, in the engine's immutable forms."""
    values = {"top_k": 7, "min_p": 0.05, "repetition_penalty": 1.2, "presence_penalty": 0.5,
              "frequency_penalty": -0.5, "min_tokens": 3, "logit_bias": {9: 2.0},
              "allowed_token_ids": [5, 6, 9], "bad_words": ["ab"], "stop": ["@"],
              "stop_token_ids": [3]}  # fmt: skip
    for model in (RolloutRequest, CompletionRequest, ChatCompletionRequest):
        assert set(Sampling.model_fields) <= set(model.model_fields), model
    request = RolloutRequest(prompts=[{"token_ids": [5]}], max_tokens=8, **values)
    params = GenerationParams.of(request.sampling())
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (7, 0.05, 1.2, 3)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.logit_bias == ((9, 2.0),) and params.allowed_token_ids == (5, 6, 9)
    assert (params.bad_words, params.stop, params.stop_token_ids) == (("ab",), ("@",), (3,))
    assert GenerationParams.of(Sampling()).allowed_token_ids is None


@pytest.mark.parametrize(
    ("case", "text", "reason"),
    [
        (dict(eos=True), "7+5=12", None),  # EOS: left out of the text (special), stop_reason null
        (dict(include_stop_str_in_output=True, skip=False, eos=True), "7+5=12</s>", None),
        (dict(stop_token="="), "7+5", "="),  # a stop token: its id, left out of the text ...
        (dict(stop_token="=", include_stop_str_in_output=True), "7+5=", "="),  # ... or kept
        (dict(stop="5=1"), "7+", "5=1"),  # a stop string: cut before it ...
        (dict(stop="5=1", include_stop_str_in_output=True), "7+5=1", "5=1"),  # ... or after it
        (dict(end="espo_stop"), "7+5=12", "espo_stop"),
        (dict(end="length"), "7+5=12", None),
    ],
)
def test_choice_text_and_stop_reason_as_vllm(case, text, reason):
    stop_token = TOKENIZER.encode(case["stop_token"])[0] if "stop_token" in case else None
    t = traj("7+5=12" if stop_token is None else "7+5=", case.get("end", "eos"), eos=case.get("eos", False))
    words = ChoiceText(
        stops=(case["stop"],) if "stop" in case else (),
        stop_token_ids=frozenset([stop_token] if stop_token is not None else []),
        eos_token_id=EOS_ID,
        skip_special_tokens=case.get("skip", True),
        include_stop_str_in_output=case.get("include_stop_str_in_output", False),
    )
    got_text, got_reason = words.text_and_reason(t, TOKENIZER)
    assert got_text == text
    assert got_reason == (stop_token if reason == "=" else reason)


def test_logprob_shapes_as_vllm():
    """Completions: the sampled token and the top-k at each step (k+1 entries when it is not among
    them); chat: the top-k; tokens as `token_id:N` on request; raw values, floored at -9999."""
    seven, plus = TOKENIZER.encode("7+")
    tops = Traces(top_token_ids=[[plus, seven], [10, 12]], top_logprobs=[[-0.1, -0.5], [-0.2, -0.3]])
    whole = traj("7+", traces=tops)
    whole.logprobs[1] = -1e6
    t = TokenDelta.tail(whole)
    strings = [TOKENIZER.decode([i]) for i in t.token_ids]
    others = {i: TOKENIZER.decode([i]) for i in (plus, seven, 10, 12)}
    out = completion_logprobs(t, 2, strings, others, ChoiceText())
    assert out.tokens == ["7", "+"] and out.token_logprobs == [-0.5, -9999.0] and out.text_offset == [0, 1]
    assert len(out.top_logprobs[0]) == 2 and len(out.top_logprobs[1]) == 3  # "7" is in its step's top 2
    assert completion_logprobs(t, 0, strings, others, ChoiceText()).top_logprobs == [
        {"7": -0.5},
        {"+": -9999.0},
    ]
    as_ids = completion_logprobs(t, 1, strings, others, ChoiceText(tokens_as_ids=True))
    assert as_ids.tokens == [f"token_id:{i}" for i in t.token_ids]
    assert set(as_ids.top_logprobs[0]) == {f"token_id:{seven}", f"token_id:{plus}"}
    chat = chat_logprobs(t, 2, strings, others, ChoiceText())
    assert [len(c.top_logprobs) for c in chat.content] == [2, 2]
    assert chat.content[0].bytes == list(b"7") and chat.content[1].logprob == -9999.0
    # a stream's delta: the tail of the tokens, its text offsets going on from what was sent
    tail = completion_logprobs(TokenDelta.tail(whole, 1), 2, strings[1:], others, ChoiceText(), offset=1)
    assert tail.tokens == ["+"] and tail.text_offset == [1] and tail.top_logprobs == out.top_logprobs[1:]


def test_chat_rendering_and_its_bad_input():
    from types import SimpleNamespace

    from espo_client.openai_protocol import ChatMessage
    from espo_server.errors import InvalidRequest
    from espo_server.openai_prompts import Prompts

    prompts = Prompts(SimpleNamespace(tokenizer=TOKENIZER, max_model_len=512, vocab_size=50), None)
    messages = [ChatMessage(role="user", content="3+"), ChatMessage(role="assistant", content="4=")]
    assert prompts.render_chat(messages) == (TOKENIZER.encode("3+4="), "3+4=")
    for kwargs, param in (
        ({"template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),  # apply_chat_template's own
        ({"template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),  # given twice
        ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt
    ):
        with pytest.raises(InvalidRequest) as caught:
            prompts.render_chat(messages, **kwargs)
        assert caught.value.param == param
