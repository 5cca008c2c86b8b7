"""OpenAI-compatible completions and chat completions in vLLM's dialect, over the same `RolloutService`.

    CompletionRequest / ChatCompletionRequest --OpenAIServing.*_call()--> RolloutRequest --plan()-->
    CallPlan --service.stream()--> trajectories --openai_answers.py--> choices (openai_choices.py:
    text, stop_reason, logprobs in vLLM's shapes; `espo` objects)

No rollout logic lives here: a request becomes one `RolloutRequest` (the chat messages rendered to
token ids with the chat template first, openai_prompts.py; the sampling settings passed on as they
are), runs through `RolloutService.plan` and `stream` like `POST /v1/rollouts`, and each trajectory
becomes one choice. Errors are the service's `InvalidRequest`, with `param` renamed to the OpenAI
request's field (`prompts[0]` -> `prompt`, `messages`). vLLM fields this server does not implement
are a 400 unless neutral (`openai_protocol.NOT_IMPLEMENTED`). The routes are in app.py; `/tokenize`
and `/detokenize` are served here too, as vLLM's.

Streaming sends each choice's tokens as they become final (held back only while a critic query may
still cut them), each choice's end in one chunk, then a last chunk with `choices: []`, the `espo`
rollout response and, with `stream_options.include_usage`, the usage; then `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import ValidationError

from espo_client.openai_protocol import (
    NOT_IMPLEMENTED,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from espo_client.protocol import RolloutRequest, Sampling

from .config import ServerConfig
from .errors import InvalidRequest, ModelNotFound, validation_body
from .events import answer, encode
from .openai_answers import Answers, Kind, OpenAICall, sse_events
from .openai_choices import ChoiceText
from .openai_prompts import Prompts, completion_prompts
from .service import RolloutService

log = logging.getLogger(__name__)


class OpenAIServing:
    """OpenAI requests -> rollout requests; trajectories -> OpenAI choices."""

    def __init__(self, service: RolloutService, config: ServerConfig) -> None:
        self.service = service
        self.model_name = config.model_name()
        self.prompts = Prompts(service.engine, config.chat_template)
        self.keep_alive_s = config.sse_keepalive_s

    # ------------------------------------------------------------------ requests

    def models(self) -> ModelList:
        engine = self.service.engine
        return ModelList(data=[ModelCard(id=self.model_name, created=0, max_model_len=engine.max_model_len)])

    def check_model(self, model: str | None) -> None:
        """A request may leave `model` out (as vLLM's); if it names one, it must be the served one."""
        if model is not None and model != self.model_name:
            raise ModelNotFound(
                f"model {model!r} is not served here; this server serves {self.model_name!r} "
                "(GET /v1/models)",
                "model",
            )

    def completion_call(self, body: CompletionRequest) -> OpenAICall:
        self._check_common(body)
        prompts = completion_prompts(body.prompt)
        if not body.add_special_tokens:  # the service tokenises texts with them: do it here instead
            prompts = [self.prompts.encode(p, False) if isinstance(p, str) else p for p in prompts]
        top = body.logprobs or 0
        request = self._rollout_request(
            body, prompts, max_tokens=body.max_tokens, top_logprobs=top, where="prompt"
        )
        return self._call("completion", body, request, "prompt")

    def chat_call(self, body: ChatCompletionRequest) -> OpenAICall:
        self._check_common(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            if body.max_tokens != body.max_completion_tokens:
                raise InvalidRequest(
                    "give max_tokens or max_completion_tokens, not both", "max_completion_tokens"
                )
        ids, text = self.prompts.render_chat(
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            add_special_tokens=body.add_special_tokens,
            template_kwargs=body.chat_template_kwargs,
        )
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
        call = self._call("chat", body, request, "messages")
        call.prompt_text = text
        return call

    def _check_common(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self.check_model(body.model)
        for name, neutral in NOT_IMPLEMENTED.items():
            if name in type(body).model_fields and getattr(body, name) not in neutral:
                raise InvalidRequest(f"{name} is not supported by this server", name)

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
            **{name: getattr(body, name) for name in Sampling.model_fields},
            "max_tokens": max_tokens,
            "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
            "prompts": [
                {"text": p, "answer": a} if isinstance(p, str) else {"token_ids": p, "answer": a}
                for p, a in zip(prompts, answers, strict=True)
            ],
            "n": body.n,
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
        text = ChoiceText(
            stops=tuple(request.stop or ()),
            stop_token_ids=frozenset(request.stop_token_ids or ()),
            eos_token_id=self.service.engine.eos_token_id,
            ignore_eos=request.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            tokens_as_ids=bool(body.return_tokens_as_token_ids),
        )
        return OpenAICall(kind, body, plan, plan.prompt_ids, f"{prefix}-{plan.request_id}", text)

    # ------------------------------------------------------------------ answers

    async def respond(self, call: OpenAICall) -> CompletionResponse | ChatCompletionResponse:
        response = await answer(self.service.stream(call.plan))
        return Answers(call, self.service.text, self.model_name).response(response)

    def sse(self, call: OpenAICall) -> AsyncIterator[bytes]:
        """Server-sent events, as OpenAI streams: `data: {chunk}` as each choice's tokens become
        final, a last chunk with the usage and the rollout response, `data: [DONE]`
        (openai_answers.py). A failure after the 200 was sent is one `data: {"error": ...}` event
        (the openai package raises it as an APIError)."""
        call.plan.token_events = True
        chunks = Answers(call, self.service.text, self.model_name)
        return sse_events(encode(self.service.stream(call.plan), chunks), self.keep_alive_s)


# ------------------------------------------------------------------------------------ helpers


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
