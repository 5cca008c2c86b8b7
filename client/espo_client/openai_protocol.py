"""The OpenAI-compatible surface of the rollout server, in vLLM's dialect: `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/tokenize`, `/detokenize`, `/version`, with ESPO's extensions.

The requests are vLLM's OpenAI requests (the sampling fields of vLLM's `SamplingParams` included:
`top_k`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `min_tokens`,
`logit_bias`, `allowed_token_ids`, `bad_words`, `stop_token_ids`, `ignore_eos`, ...), plus ESPO's
fields as extra body fields (the `openai` package sends them with `extra_body={...}`): `stop_rule`,
`rule_params`, `shadow`, `batch_id`, `state`, `update_state`, `include`, `request_id`, `answer`.
The server turns such a request into a `RolloutRequest` and runs it like `POST /v1/rollouts`.
Each choice has an `espo` object (`EspoChoice`: the trajectory as `POST /v1/rollouts` returns it,
with end reason, stop step, reward, policy version, token ids and raw logprobs, plus the prompt's
token ids); the response's own `espo` object is the rollout response without its trajectories.

Finish reasons stay in the standard set: a choice the stop rule cut reads `finish_reason: "stop"`
with `stop_reason: "espo_stop"` (vLLM's field for what stopped a choice: a stop string, a stop token
id, or null for EOS), and `espo.end_reason == "espo_stop"`. A learner must read one of those two:
a stopped choice is an absorbing failure (reward `r_fail`), not a finished answer.

Log-probabilities are raw: the log-softmax of the model's logits before temperature, penalties,
logit bias, token masks, top-k, top-p and min-p (see `protocol.Sampling`).

    from openai import OpenAI
    from espo_client.openai_protocol import EspoChoice

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    out = client.completions.create(model="espo-toy", prompt="7+5+9+2=", n=4, max_tokens=64,
                                    extra_body={"stop_rule": "espo", "top_k": 20})
    for choice in out.choices:
        espo = EspoChoice.model_validate(choice.model_extra["espo"])
        print(choice.finish_reason, choice.model_extra["stop_reason"], espo.reward, espo.token_ids)

Requests forbid unknown fields like every model of this protocol (a misspelled sampling field that
is silently ignored corrupts RL data): a field this server does not know is a 400 naming it, and
the vLLM fields it knows but does not implement (`NOT_IMPLEMENTED`: beam search, echo, tools,
response_format, ...) are accepted only at their neutral values, any other value a 400 naming the
field. A null value means "unset", as in vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator

from .protocol import (
    MAX_TOP_K_LOGPROBS,
    EspoState,
    RolloutResponse,
    RuleParams,
    Sampling,
    TraceName,
    Trajectory,
)
from .stop_rule import StopRule

__all__ = [
    "ESPO_STOP_REASON",
    "FINISH_REASONS",
    "NOT_IMPLEMENTED",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprob",
    "ChatLogprobs",
    "ChatMessage",
    "ChatMessageOut",
    "ChatTopLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionUsage",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "EspoChoice",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
    "VersionResponse",
]

MAX_STOP_STRINGS = 16

FinishReason = Literal["stop", "length", "abort"]
"""vLLM's finish reasons: `stop` (EOS, a stop token, a stop string, or the stop rule: see
`stop_reason`), `length` (max_tokens), `abort` (cancelled)."""

ESPO_STOP_REASON = "espo_stop"
"""`stop_reason` of a choice the stop rule cut (its finish_reason is `stop`)."""

FINISH_REASONS: dict[str, FinishReason] = {
    "eos": "stop",
    "length": "length",
    "espo_stop": "stop",
    "abort": "abort",
}
"""Trajectory.end_reason -> finish_reason."""

NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "echo": (False,),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "priority": (0,),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True),
    "reasoning_effort": (None,),
    "include_reasoning": (True,),
}
"""vLLM request fields this server does not implement -> the neutral values it accepts (any other
value is a 400 naming the field). A field of vLLM's requests that is in neither this table nor the
models (prompt_embeds, structured_outputs, chat_template, vllm_xargs, ...) is a 400 too."""


def _not_implemented(field: str, default: Any = None) -> Any:
    neutral = " or ".join(repr(v) for v in NOT_IMPLEMENTED[field])
    return Field(default, description=f"Not implemented: accepted only as {neutral}.")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(forms: str) -> WrapValidator:
    """A union field's error names the field itself (`prompt`), not the union member (`prompt.str`)."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {forms}") from None

    return WrapValidator(validate)


class StreamOptions(_Model):
    include_usage: bool | None = Field(False, description="Send a last chunk with the usage (choices: []).")
    continuous_usage_stats: bool | None = Field(
        False, description="Every chunk carries the usage so far (completion tokens of the choices sent)."
    )


class _EspoFields(_Model):
    """ESPO's extra body fields, as in `POST /v1/rollouts`."""

    stop_rule: StopRule | None = Field(
        None, description="none, espo, random, regret_only or value_only (unset: the server's default)."
    )
    rule_params: RuleParams | None = Field(None, description="Overrides of the rule's parameters.")
    shadow: bool = Field(False, description="Run the rule without stopping; record shadow_stop_step.")
    batch_id: str | None = Field(None, max_length=200, description="Server-owned state batch (see rollouts).")
    state: EspoState | None = Field(None, description="Learner-owned ESPO state (see rollouts).")
    update_state: bool = Field(True, description="Fold this call into the server-owned state.")
    include: list[TraceName] = Field(
        default_factory=list, description="Traces in each choice's `espo` object: regret, z, values, entropy."
    )
    entropy_top_k: int | None = Field(
        None, ge=1, le=MAX_TOP_K_LOGPROBS, description="k of the entropy trace."
    )
    request_id: str | None = Field(
        None, max_length=200, description="Idempotency key: a retry gets the first call's answer."
    )
    answer: str | list[str] | None = Field(
        None,
        description="Expected answer(s), one per prompt (or one for all): the server's verifier, if it has "
        "one, rewards eos choices (espo.reward).",
    )


class _OpenAIRequest(_EspoFields, Sampling):
    """What completions and chat requests share: the sampling settings (`protocol.Sampling`, with
    OpenAI's `stop` as a string or a list and each route's own max_tokens), ESPO's fields, and vLLM's
    output options."""

    model: str | None = Field(None, description="The served model's name (GET /v1/models); unset: that one.")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stream: bool = Field(False, description="Server-sent events: deltas as tokens become final.")
    stream_options: StreamOptions | None = None
    stop: Annotated[
        str | list[Annotated[str, Field(min_length=1)]] | None,
        _one_of("a non-empty string or a list of them"),
    ] = Field(None, description="Stop strings (up to 16): a choice ends once its text contains one.")
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop string (or stop token's text) at the end of the text."
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = Field(
        True, description="Spaces around special tokens in the text (slow tokenizers only, as vLLM)."
    )
    return_token_ids: bool | None = Field(
        None, description="Each choice carries its token_ids and the prompt's (prompt_token_ids)."
    )
    return_tokens_as_token_ids: bool | None = Field(
        None, description="Logprob tokens as 'token_id:N' strings instead of decoded text."
    )
    user: str | None = Field(None, description="Ignored (as by vLLM).")
    use_beam_search: bool = _not_implemented("use_beam_search", False)
    length_penalty: float = _not_implemented("length_penalty", 1.0)
    prompt_logprobs: int | None = _not_implemented("prompt_logprobs")
    truncate_prompt_tokens: int | None = _not_implemented("truncate_prompt_tokens")
    priority: int = _not_implemented("priority", 0)
    response_format: dict[str, Any] | None = _not_implemented("response_format")
    echo: bool = _not_implemented("echo", False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """As vLLM: a null field takes its default (OpenAI clients send `"n": null` and the like)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v for k, v in data.items() if not (v is None and k in fields and fields[k].default is not None)
        }


class CompletionRequest(_OpenAIRequest):
    """`POST /v1/completions`: OpenAI's legacy completions, text or token-id prompts."""

    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
    ] = Field(..., description="A text, texts, token ids, or lists of token ids (exact: no re-tokenisation).")
    max_tokens: int = Field(16, ge=1, description="Tokens per choice (OpenAI's default: 16).")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Return the sampled tokens' raw logprobs and, at each step, the top-N and the "
        "sampled token's (vLLM's shape: up to N+1 entries).",
    )
    add_special_tokens: bool = Field(True, description="Text prompts: add the tokenizer's special tokens.")
    suffix: str | None = _not_implemented("suffix")
    best_of: int | None = _not_implemented("best_of")


class ContentPart(_Model):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIRequest):
    """`POST /v1/chat/completions`: the messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens per choice (default: the rest of the context)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens.")
    logprobs: bool = Field(False, description="Return the sampled tokens' raw logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="And the top-N tokens at each step.")
    add_generation_prompt: bool = Field(True, description="Passed to the chat template.")
    continue_final_message: bool = Field(
        False,
        description="Render the last message open-ended, to be continued (not with add_generation_prompt).",
    )
    add_special_tokens: bool = Field(
        False, description="Add the tokenizer's special tokens on top of what the template renders."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Passed to the chat template.")
    return_prompt_text: bool | None = Field(None, description="Return the rendered prompt (prompt_text).")
    tools: list[Any] | None = _not_implemented("tools")
    tool_choice: Any = _not_implemented("tool_choice")
    parallel_tool_calls: bool | None = _not_implemented("parallel_tool_calls")
    reasoning_effort: str | None = _not_implemented("reasoning_effort")
    include_reasoning: bool = _not_implemented("include_reasoning", True)


# ------------------------------------------------------------------------------------ responses


class EspoChoice(Trajectory):
    """A choice's `espo` object: its trajectory (as POST /v1/rollouts returns it) and the prompt's ids."""

    prompt_token_ids: list[int] = Field(..., description="The prompt's token ids (chat: after the template).")


class CompletionUsage(_Model):
    prompt_tokens: int = Field(..., description="Prompt tokens, each prompt counted once.")
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float] = Field(..., description="Raw logprob of each sampled token.")
    top_logprobs: list[dict[str, float]] | None = Field(
        None, description="At each step the sampled token and the top-N, by token string."
    )
    text_offset: list[int]


_STOP_REASON = Field(
    None,
    description="What stopped the choice: a stop string, a stop token id, 'espo_stop' (the stop rule), "
    "or null (EOS, max_tokens, abort).",
)


class CompletionChoice(_Model):
    index: int = Field(..., description="prompt_index * n + sample_index.")
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = _STOP_REASON
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the choice's token ids.")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: the prompt's.")
    espo: EspoChoice


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    espo: RolloutResponse = Field(..., description="The rollout response without its trajectories.")


class CompletionChunkChoice(_Model):
    """A streamed choice's next part: the text, logprobs and token ids of its next final tokens. Its
    last chunk has its finish_reason, stop_reason and `espo` object (the whole trajectory)."""

    index: int = Field(..., description="prompt_index * n + sample_index.")
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = _STOP_REASON
    token_ids: list[int] | None = Field(None, description="With return_token_ids: this chunk's token ids.")
    prompt_token_ids: list[int] | None = Field(
        None, description="With return_token_ids: the prompt's, on the choice's first chunk."
    )
    espo: EspoChoice | None = Field(None, description="On the choice's last chunk: its trajectory.")


class CompletionChunk(_Model):
    """One server-sent event of a streamed completion: the next part of one choice, or (last) the
    usage and the rollout response."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: CompletionUsage | None = None
    espo: RolloutResponse | None = Field(None, description="On the last chunk: the rollout response.")


class ChatTopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Model):
    content: list[ChatLogprob] | None = None


class ChatMessageOut(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Model):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = _STOP_REASON
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the choice's token ids.")
    espo: EspoChoice


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: the prompt's ids.")
    prompt_text: str | None = Field(None, description="With return_prompt_text: the rendered prompt.")
    espo: RolloutResponse = Field(..., description="The rollout response without its trajectories.")


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    """A streamed choice's next part (the role on its first); its last chunk has its finish_reason,
    stop_reason and `espo` object (the whole trajectory)."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = _STOP_REASON
    token_ids: list[int] | None = Field(None, description="With return_token_ids: this chunk's token ids.")
    espo: EspoChoice | None = Field(None, description="On the choice's last chunk: its trajectory.")


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed chat completion: the next part of one choice, or (last) the
    usage and the rollout response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: on the first chunk.")
    prompt_text: str | None = Field(None, description="With return_prompt_text: on the first chunk.")
    espo: RolloutResponse | None = Field(None, description="On the last chunk: the rollout response.")


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "espo-server"
    max_model_len: int


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------ tokenizer


class TokenizeCompletionRequest(_Model):
    """`POST /tokenize` of a text, as vLLM's."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (e.g. BOS).")
    return_token_strs: bool | None = Field(False, description="Also return each token's string.")


class TokenizeChatRequest(_Model):
    """`POST /tokenize` of chat messages (rendered with the chat template first), as vLLM's."""

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(_Model):
    prompt: str


class VersionResponse(_Model):
    version: str = Field(..., description="The vLLM version serving (what vLLM's /version says).")
    espo_server: str = Field(..., description="This server's version.")
