"""OpenAI-compatible completions and chat completions, over the same `RolloutService`.

    CompletionRequest / ChatCompletionRequest --OpenAIServing.*_call()--> RolloutRequest --plan()-->
    CallPlan --service.stream()--> trajectories --openai_answers.py--> choices (finish_reason,
    logprobs, `espo` objects)

No rollout logic lives here: a request becomes one `RolloutRequest` (the chat messages rendered to
token ids with the chat template first), runs through `RolloutService.plan` and `stream` like
`POST /v1/rollouts`, and each trajectory becomes one choice. Errors are the service's
`InvalidRequest`, with `param` renamed to the OpenAI request's field (`prompts[0]` -> `prompt`,
`messages`). The routes are in app.py.

Streaming sends one server-sent event per choice once the choice is final (the stop rule may still
cut tokens back while the critic answers, so tokens are not sent one by one), then a last chunk with
`choices: []`, the `espo` rollout response and, with `stream_options.include_usage`, the usage; then
`data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import ValidationError

from espo_client.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from espo_client.protocol import RolloutRequest

from .config import ServerConfig
from .errors import InvalidRequest, ModelNotFound, validation_body
from .events import answer, encode
from .openai_answers import Answers, Kind, OpenAICall, sse_events
from .service import RolloutService

log = logging.getLogger(__name__)


class OpenAIServing:
    """OpenAI requests -> rollout requests; trajectories -> OpenAI choices."""

    def __init__(self, service: RolloutService, config: ServerConfig) -> None:
        self.service = service
        self.model_name = config.model_name()
        self.chat_template = _read_template(config.chat_template)

    # ------------------------------------------------------------------ requests

    def models(self) -> ModelList:
        engine = self.service.engine
        return ModelList(data=[ModelCard(id=self.model_name, created=0, max_model_len=engine.max_model_len)])

    def completion_call(self, body: CompletionRequest) -> OpenAICall:
        self._check_common(body)
        for name, neutral in (("echo", False), ("suffix", None)):
            if getattr(body, name) not in (neutral, ""):
                raise InvalidRequest(f"{name} is not supported by this server", name)
        if body.best_of not in (None, 1):
            raise InvalidRequest("best_of is not supported by this server (use n)", "best_of")
        prompts = _completion_prompts(body.prompt)
        top = body.logprobs or 0
        request = self._rollout_request(
            body, prompts, max_tokens=body.max_tokens or 16, top_logprobs=top, where="prompt"
        )
        return self._call("completion", body, request, "prompt")

    def chat_call(self, body: ChatCompletionRequest) -> OpenAICall:
        self._check_common(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            if body.max_tokens != body.max_completion_tokens:
                raise InvalidRequest(
                    "give max_tokens or max_completion_tokens, not both", "max_completion_tokens"
                )
        ids = self._render_chat(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = self.service.engine.max_model_len - len(ids)
            if max_tokens < 1:
                raise InvalidRequest(
                    f"the messages take {len(ids)} tokens: no room left in the model length "
                    f"{self.service.engine.max_model_len}",
                    "messages",
                )
        top = (body.top_logprobs or 0) if body.logprobs else 0
        request = self._rollout_request(
            body, [ids], max_tokens=max_tokens, top_logprobs=top, where="messages"
        )
        return self._call("chat", body, request, "messages")

    def _check_common(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model != self.model_name:
            raise ModelNotFound(
                f"model {body.model!r} is not served here; this server serves "
                f"{self.model_name!r} (GET /v1/models)",
                "model",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0):
                raise InvalidRequest(f"{name} is not supported by this server", name)
        if body.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server", "logit_bias")

    def _render_chat(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.service.engine.tokenizer
        messages = []
        for message in body.messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            messages.append(entry)
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                "this model's tokenizer has no chat template: use /v1/completions, or start the server "
                "with --chat-template",
                "messages",
            )
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                chat_template=self.chat_template,
            )
        except Exception as exc:  # the template's own complaints (jinja's raise_exception, bad roles)
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", "messages") from exc
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise InvalidRequest("the messages render to no tokens", "messages")
        return ids

    def _rollout_request(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[str | list[int]],
        *,
        max_tokens: int,
        top_logprobs: int,
        where: str,
    ) -> RolloutRequest:
        answers = body.answer
        if isinstance(answers, list):
            if len(answers) != len(prompts):
                raise InvalidRequest(f"{len(answers)} answers for {len(prompts)} prompts", "answer")
        else:
            answers = [answers] * len(prompts)
        include = list(dict.fromkeys([*body.include, "text", *(["top_logprobs"] if top_logprobs else [])]))
        fields = {
            "prompts": [
                {"text": p, "answer": a} if isinstance(p, str) else {"token_ids": p, "answer": a}
                for p, a in zip(prompts, answers, strict=True)
            ],
            "n": body.n,
            "max_tokens": max_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "seed": body.seed,
            "stop_token_ids": body.stop_token_ids,
            "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
            "ignore_eos": body.ignore_eos,
            "stop_rule": body.stop_rule,
            "rule_params": body.rule_params,
            "shadow": body.shadow,
            "batch_id": body.batch_id,
            "state": body.state,
            "update_state": body.update_state,
            "include": include,
            "entropy_top_k": body.entropy_top_k,
            "top_logprobs": top_logprobs or None,
            "request_id": body.request_id,
        }
        try:
            return RolloutRequest.model_validate(fields)
        except ValidationError as exc:
            body = validation_body(exc.errors(), lambda param: _openai_param(param, where, len(prompts)))
            raise InvalidRequest(body.message, body.param) from exc

    def _call(self, kind: Kind, body, request: RolloutRequest, where: str) -> OpenAICall:
        try:
            plan = self.service.plan(request)
        except InvalidRequest as exc:
            param = _openai_param(exc.param, where, len(request.prompts))
            raise type(exc)(exc.message, param) from exc
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return OpenAICall(kind, body, plan, plan.prompt_ids, f"{prefix}-{plan.request_id}")

    # ------------------------------------------------------------------ answers

    async def respond(self, call: OpenAICall) -> CompletionResponse | ChatCompletionResponse:
        response = await answer(self.service.stream(call.plan))
        return Answers(call, self.service.text, self.model_name).response(response)

    def sse(self, call: OpenAICall) -> AsyncIterator[bytes]:
        """Server-sent events, as OpenAI streams: `data: {chunk}` per finished choice, a last chunk
        with the usage and the rollout response, `data: [DONE]`. A failure after the 200 was sent is
        one `data: {"error": ...}` event (the openai package raises it as an APIError)."""
        chunks = Answers(call, self.service.text, self.model_name)
        return sse_events(encode(self.service.stream(call.plan), chunks))


# ------------------------------------------------------------------------------------ helpers


def _read_template(value: str | None) -> str | None:
    """--chat-template: a file's path or the template itself."""
    if value is None:
        return None
    path = Path(value)
    try:
        if len(value) < 4096 and path.is_file():
            return path.read_text()
    except OSError:
        pass
    return value


def _completion_prompts(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's four prompt forms -> texts and token-id lists."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty", "prompt")
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out: list[str | list[int]] = []
    for i, p in enumerate(prompt):
        if not p:
            raise InvalidRequest(f"prompt[{i}] must not be empty", f"prompt[{i}]")
        out.append(p if isinstance(p, str) else list(p))
    return out


def _openai_param(param: str | None, where: str, prompts: int) -> str | None:
    """A RolloutRequest field name -> the OpenAI request's (prompts[i].x -> prompt[i] / messages)."""
    if param is None:
        return None
    if param.startswith("prompts"):
        if where == "messages":
            return "messages"
        rest = param[len("prompts") :]
        index = rest[: rest.index("]") + 1] if rest.startswith("[") else ""
        return "prompt" + (index if prompts > 1 else "")
    if param == "max_tokens" and where == "messages":
        return "max_tokens"
    if param == "top_logprobs":
        return "logprobs" if where == "prompt" else "top_logprobs"
    return param
