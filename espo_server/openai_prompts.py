"""OpenAI-style prompts -> token ids: completion prompts, chat messages through the chat template,
and vLLM's `/tokenize` and `/detokenize` over the same rendering.

Knows the tokenizer and the chat template, nothing of calls or of the engine's sampling.
"""

from __future__ import annotations

from pathlib import Path

from espo_client.openai_protocol import (
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

from .errors import InvalidRequest


class Prompts:
    """The served model's tokenizer and chat template, as the OpenAI routes use them."""

    def __init__(self, engine, chat_template: str | None) -> None:
        self.engine = engine  # engine.PolicyEngine: its tokenizer, max_model_len, vocab_size
        self.tokenizer = engine.tokenizer
        self.chat_template = read_template(chat_template)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        template_kwargs: dict | None = None,
    ) -> tuple[list[int], str]:
        """Messages -> (token ids, text) through the chat template."""
        tokenizer = self.tokenizer
        if add_generation_prompt and continue_final_message:
            raise InvalidRequest(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false)",
                "continue_final_message",
            )
        rendered = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            rendered.append(entry)
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(
                "this model's tokenizer has no chat template: use /v1/completions, or start the server "
                "with --chat-template",
                "messages",
            )
        try:
            text = tokenizer.apply_chat_template(
                rendered,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=self.chat_template,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # the template's own complaints (jinja's raise_exception, bad roles)
            # a TypeError with kwargs: one of them is apply_chat_template's own (tokenize=..., ...)
            param = "chat_template_kwargs" if template_kwargs and isinstance(exc, TypeError) else "messages"
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param) from exc
        if not isinstance(text, str):  # a kwarg that changed what apply_chat_template returns
            raise InvalidRequest(
                "chat_template_kwargs may only hold the template's variables", "chat_template_kwargs"
            )
        ids = self.encode(text, add_special_tokens)
        if not ids:
            raise InvalidRequest("the messages render to no tokens", "messages")
        return ids, text

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """`POST /tokenize`, as vLLM's: a text, or chat messages through the template."""
        if isinstance(body, TokenizeChatRequest):
            ids, _ = self.render_chat(
                body.messages,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                add_special_tokens=body.add_special_tokens,
                template_kwargs=body.chat_template_kwargs,
            )
        else:
            ids = self.encode(body.prompt, body.add_special_tokens)
        strings = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids, token_strs=strings
        )

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """`POST /detokenize`, as vLLM's: special tokens kept."""
        vocab = self.engine.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise InvalidRequest(f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))


def completion_prompts(prompt: str | list) -> list[str | list[int]]:
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


def read_template(value: str | None) -> str | None:
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
