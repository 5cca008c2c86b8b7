"""The OpenAI-compatible surface of the rollout server: `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, with ESPO's extensions in OpenAI's style.

The requests are OpenAI's, plus ESPO's fields as extra body fields (the `openai` package sends them
with `extra_body={...}`): `stop_rule`, `rule_params`, `shadow`, `batch_id`, `state`, `update_state`,
`include`, `request_id`, `stop_token_ids`, `ignore_eos`, `answer`. The server turns such a request
into a `RolloutRequest` and runs it like `POST /v1/rollouts`; each choice comes back with
`finish_reason: "espo_stop"` where the rule stopped it and an `espo` object (`EspoChoice`: the
trajectory as `POST /v1/rollouts` returns it, with stop step, reward, policy version, token ids and
raw logprobs, plus the prompt's token ids); the response's own `espo` object is the rollout response
without its trajectories (usage, state used and after).

    from openai import OpenAI
    from espo_client.openai_protocol import EspoChoice

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    out = client.completions.create(model="espo-toy", prompt="7+5+9+2=", n=4, max_tokens=64,
                                    extra_body={"stop_rule": "espo"})
    for choice in out.choices:
        espo = EspoChoice.model_validate(choice.model_extra["espo"])
        print(choice.finish_reason, espo.stop_step, espo.reward, espo.token_ids)

Requests forbid unknown fields like every model of this protocol (a misspelled sampling field that
is silently ignored corrupts RL data): OpenAI fields this server does not implement (tools,
response_format, ...) are answered 400 naming the field; `echo`, `suffix`, `best_of`, penalties and
`logit_bias` are accepted only at their neutral values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator

from .protocol import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K_LOGPROBS,
    EspoState,
    RolloutResponse,
    RuleParams,
    TraceName,
    Trajectory,
)
from .stop_rule import StopRule

__all__ = [
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
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionUsage",
    "ContentPart",
    "EspoChoice",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "StreamOptions",
]

MAX_STOP_STRINGS = 16

FinishReason = Literal["stop", "length", "espo_stop", "abort"]
"""OpenAI's finish reasons, with ESPO's: `stop` (eos: EOS, a stop token or a stop string), `length`
(max_tokens), `espo_stop` (stopped by the rule: an absorbing failure, reward r_fail), `abort`."""

FINISH_REASONS: dict[str, FinishReason] = {
    "eos": "stop",
    "length": "length",
    "espo_stop": "espo_stop",
    "abort": "abort",
}
"""Trajectory.end_reason -> finish_reason."""


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
    include_usage: bool = Field(False, description="Send a last chunk with the usage (choices: []).")


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
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a response.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS.")
    answer: str | list[str] | None = Field(
        None,
        description="Expected answer(s), one per prompt (or one for all): the server's verifier, if it has "
        "one, rewards eos choices (espo.reward).",
    )


class _Sampling(_EspoFields):
    model: str = Field(..., description="The served model's name (GET /v1/models).")
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description="Sampling temperature, 0 to 2 (default 1)."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stream: bool = Field(False, description="Server-sent events: a chunk per choice as it finishes.")
    stream_options: StreamOptions | None = None
    stop: Annotated[
        str | list[Annotated[str, Field(min_length=1)]] | None,
        _one_of("a non-empty string or a list of them"),
    ] = Field(None, description="Stop strings (up to 16): a choice ends once its text contains one.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Base seed (0 to 2**63-1); choice j of prompt i uses seed + i*n + j.",
    )
    presence_penalty: float | None = Field(None, description="Accepted only as 0 (not implemented).")
    frequency_penalty: float | None = Field(None, description="Accepted only as 0 (not implemented).")
    logit_bias: dict[str, float] | None = Field(None, description="Accepted only empty (not implemented).")
    user: str | None = Field(None, description="Ignored.")


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: OpenAI's legacy completions, text or token-id prompts."""

    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
    ] = Field(..., description="A text, texts, token ids, or lists of token ids (exact: no re-tokenisation).")
    max_tokens: int | None = Field(16, ge=1, description="Tokens per choice (OpenAI's default: 16).")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return the sampled tokens' raw logprobs and the top-N at each step."
    )
    echo: bool = Field(False, description="Accepted only as false (not implemented).")
    suffix: str | None = Field(None, description="Accepted only as null (not implemented).")
    best_of: int | None = Field(None, ge=1, description="Accepted only as 1 (not implemented).")


class ContentPart(_Model):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: the messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens per choice (default: the rest of the context)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens.")
    logprobs: bool = Field(False, description="Return the sampled tokens' raw logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="And the top-N tokens at each step.")
    add_generation_prompt: bool = Field(True, description="Passed to the chat template.")


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
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int = Field(..., description="prompt_index * n + sample_index.")
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    espo: EspoChoice


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    espo: RolloutResponse = Field(..., description="The rollout response without its trajectories.")


class CompletionChunk(_Model):
    """One server-sent event of a streamed completion: one finished choice, or (last) the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
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
    espo: EspoChoice


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    espo: RolloutResponse = Field(..., description="The rollout response without its trajectories.")


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    espo: EspoChoice | None = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed chat completion: one whole finished choice (its delta holds
    all its text: a choice is final only once the stop rule is done with it), or (last) the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
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
