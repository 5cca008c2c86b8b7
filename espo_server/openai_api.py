"""OpenAI-compatible completions and chat completions, over the same `RolloutService`.

    CompletionRequest / ChatCompletionRequest --OpenAIServing.*_call()--> RolloutRequest --plan()-->
    CallPlan --service.stream()--> trajectories --> choices (finish_reason, logprobs, `espo` objects)

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

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from espo_client.openai_protocol import (
    FINISH_REASONS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatLogprobs,
    ChatMessageOut,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EspoChoice,
    ModelCard,
    ModelList,
)
from espo_client.protocol import GroupEvent, RolloutRequest, RolloutResponse, Trajectory

from .config import ServerConfig
from .errors import InvalidRequest, ModelNotFound, error_body, validation_body
from .service import CallPlan, RolloutService

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]


@dataclass
class OpenAICall:
    """A validated OpenAI request: its rollout plan and what the answer needs besides."""

    kind: Kind
    body: CompletionRequest | ChatCompletionRequest
    plan: CallPlan
    prompt_ids: list[list[int]]
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stops(self) -> list[str]:
        stop = self.body.stop
        return [stop] if isinstance(stop, str) else list(stop or [])


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
        response: RolloutResponse | None = None
        async for item in self.service.stream(call.plan):
            if isinstance(item, RolloutResponse):
                response = item
        assert response is not None
        choices = [self._choice(call, t) for t in response.trajectories]
        model = CompletionResponse if call.kind == "completion" else ChatCompletionResponse
        return model(
            id=call.id,
            created=call.created,
            model=self.model_name,
            choices=choices,
            usage=self._usage(call, response),
            espo=response.model_copy(update={"trajectories": []}),
        )

    async def sse(self, call: OpenAICall) -> AsyncIterator[bytes]:
        """Server-sent events, as OpenAI streams: `data: {chunk}` per finished choice, a last chunk
        with the usage and the rollout response, `data: [DONE]`. A failure after the 200 was sent is
        one `data: {"error": ...}` event (the openai package raises it as an APIError)."""
        chunk_model = CompletionChunk if call.kind == "completion" else ChatCompletionChunk
        common = {"id": call.id, "created": call.created, "model": self.model_name}
        include_usage = bool(call.body.stream_options and call.body.stream_options.include_usage)
        try:
            async for item in self.service.stream(call.plan):
                if isinstance(item, RolloutResponse):
                    last = chunk_model(
                        **common,
                        choices=[],
                        usage=self._usage(call, item) if include_usage else None,
                        espo=item.model_copy(update={"trajectories": []}),
                    )
                    yield _event(last.model_dump_json())
                elif isinstance(item, GroupEvent):
                    continue  # OpenAI streams have no group events; choices carry their prompt index
                elif call.kind == "completion":
                    yield _event(chunk_model(**common, choices=[self._choice(call, item)]).model_dump_json())
                else:
                    choice = self._choice(call, item)
                    delta = ChatChunkChoice(
                        index=choice.index,
                        delta=ChatDelta(role="assistant", content=choice.message.content),
                        logprobs=choice.logprobs,
                        finish_reason=choice.finish_reason,
                        espo=choice.espo,
                    )
                    yield _event(chunk_model(**common, choices=[delta]).model_dump_json())
        except Exception as exc:
            log.exception("OpenAI stream failed")
            yield _event(json.dumps({"error": error_body(exc).model_dump()}))
        yield _event("[DONE]")

    def _usage(self, call: OpenAICall, response: RolloutResponse) -> CompletionUsage:
        prompt = sum(len(ids) for ids in call.prompt_ids)
        completion = response.usage.generated_tokens
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _choice(self, call: OpenAICall, t: Trajectory) -> CompletionChoice | ChatChoice:
        body = call.body
        index = t.prompt_index * body.n + t.sample_index
        text = t.text or ""
        if t.end_reason == "eos" and call.stops:
            text = _cut_at_stop(text, call.stops)
        finish = FINISH_REASONS[t.end_reason]
        espo = EspoChoice(**t.model_dump(), prompt_token_ids=call.prompt_ids[t.prompt_index])
        if call.kind == "completion":
            assert isinstance(body, CompletionRequest)
            logprobs = self._completion_logprobs(t, body.logprobs) if body.logprobs is not None else None
            return CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish, espo=espo
            )
        assert isinstance(body, ChatCompletionRequest)
        chat_logprobs = self._chat_logprobs(t, body.top_logprobs or 0) if body.logprobs else None
        return ChatChoice(
            index=index,
            message=ChatMessageOut(content=text),
            logprobs=chat_logprobs,
            finish_reason=finish,
            espo=espo,
        )

    def _top(self, t: Trajectory, k: int) -> list[list[tuple[int, float]]]:
        traces = t.traces
        if k <= 0 or traces is None or traces.top_token_ids is None or traces.top_logprobs is None:
            return [[] for _ in t.token_ids]
        return [
            list(zip(ids[:k], lps[:k], strict=True))
            for ids, lps in zip(traces.top_token_ids, traces.top_logprobs, strict=True)
        ]

    def _completion_logprobs(self, t: Trajectory, k: int) -> CompletionLogprobs:
        strings = self.service.token_strings(t.token_ids)
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        top = None
        if k > 0:
            top = [
                {self.service.token_strings([token])[0]: lp for token, lp in step} for step in self._top(t, k)
            ]
        return CompletionLogprobs(
            tokens=strings, token_logprobs=t.logprobs, top_logprobs=top, text_offset=offsets
        )

    def _chat_logprobs(self, t: Trajectory, k: int) -> ChatLogprobs:
        strings = self.service.token_strings(t.token_ids)
        content = []
        for s, lp, step in zip(strings, t.logprobs, self._top(t, k), strict=True):
            top = []
            for token, token_lp in step:
                (ts,) = self.service.token_strings([token])
                top.append(ChatTopLogprob(token=ts, logprob=token_lp, bytes=list(ts.encode())))
            content.append(ChatLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)


# ------------------------------------------------------------------------------------ helpers


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


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


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """OpenAI leaves the stop string out of the text: cut at the first one found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text
