"""A trajectory as vLLM's OpenAI server words a choice: its text, its stop_reason, its logprobs.

vLLM's rules, followed here so that a client sees the same choice from this server as from
`vllm serve`:
- text: special tokens skipped (`skip_special_tokens`); a choice ended by EOS or a stop token
  leaves that token's text out, one ended by a stop string is cut before the string (both kept
  with `include_stop_str_in_output`);
- stop_reason: the stop string or stop token id that ended the choice, null for EOS, max_tokens
  and aborts, and `espo_stop` where the stop rule cut it (finish_reason `stop`);
- logprobs: completions give at each step the sampled token's and the top-N (up to N+1 entries),
  chat the top-N; tokens are decoded strings, or `token_id:N` with `return_tokens_as_token_ids`;
  logprobs below -9999 read -9999, as vLLM's.
The logprobs are the trajectory's: raw (before temperature and every other sampling setting).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from espo_client.openai_protocol import (
    ESPO_STOP_REASON,
    ChatLogprob,
    ChatLogprobs,
    ChatTopLogprob,
    CompletionLogprobs,
)
from espo_client.protocol import Trajectory

from .events import TokenDelta

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ChoiceText:
    """What decides a choice's text and stop_reason, from its request."""

    stops: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_id: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    tokens_as_ids: bool = False
    """return_tokens_as_token_ids: logprob tokens as `token_id:N`."""

    def ends_choice(self, token: int) -> bool:
        """EOS (unless ignore_eos) or a stop token: the engine ends the choice with it."""
        return (token == self.eos_token_id and not self.ignore_eos) or token in self.stop_token_ids

    def ended_by_token(self, t: Trajectory) -> bool:
        """An eos trajectory whose last token ended it (EOS or a stop token), not a stop string."""
        return t.end_reason == "eos" and bool(t.token_ids) and self.ends_choice(t.token_ids[-1])

    def stop_reason(self, t: Trajectory, text: str) -> int | str | None:
        """vLLM's stop_reason; `text` is the decoded response (before any cut)."""
        if t.end_reason == "espo_stop":
            return ESPO_STOP_REASON
        if t.end_reason != "eos" or not t.token_ids:
            return None
        last = t.token_ids[-1]
        if last == self.eos_token_id and not self.ignore_eos:
            return None
        if last in self.stop_token_ids:
            return last
        found = _first_stop(text, self.stops)
        return found[1] if found else None

    def text_and_reason(self, t: Trajectory, tokenizer) -> tuple[str, int | str | None]:
        """The choice's text and stop_reason."""
        ids = list(t.token_ids)
        by_token = self.ended_by_token(t)
        if by_token and not self.include_stop_str_in_output:
            ids = ids[:-1]
        text = decode(tokenizer, ids, self.skip_special_tokens, self.spaces_between_special_tokens)
        reason = self.stop_reason(t, text)
        if t.end_reason == "eos" and not by_token:
            found = _first_stop(text, self.stops)
            if found is not None:
                at, stop = found
                text = text[: at + len(stop)] if self.include_stop_str_in_output else text[:at]
        return text, reason

    def token(self, token_id: int, string: str) -> str:
        return f"token_id:{token_id}" if self.tokens_as_ids else string


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool, spaces: bool = True) -> str:
    """Token ids -> text; `spaces_between_special_tokens` reaches slow tokenizers only (as in vLLM)."""
    if getattr(tokenizer, "is_fast", True):
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(
        list(ids), skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces
    )


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop string found earliest in `text`, and where."""
    found = [(i, s) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    return min(found) if found else None


def _top(tokens: TokenDelta, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (token id, raw logprob) at each step, from the `top_logprobs` trace."""
    if k <= 0 or tokens.top_token_ids is None or tokens.top_logprobs is None:
        return [[] for _ in tokens.token_ids]
    return [
        list(zip(ids[:k], lps[:k], strict=True))
        for ids, lps in zip(tokens.top_token_ids, tokens.top_logprobs, strict=True)
    ]


def completion_logprobs(
    tokens: TokenDelta,
    k: int,
    strings: Sequence[str],
    strings_of: dict[int, str],
    text: ChoiceText,
    offset: int = 0,
) -> CompletionLogprobs:
    """Completions' logprobs of `tokens` (a whole choice, or a stream's delta whose text_offset
    starts at `offset`): `strings` are the tokens decoded one by one, `strings_of` the decoded top
    tokens."""
    offsets, at = [], offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    top = []
    for token, s, lp, step in zip(tokens.token_ids, strings, tokens.logprobs, _top(tokens, k), strict=True):
        entry = {text.token(token, s): max(lp, MIN_LOGPROB)}
        for other, other_lp in step:
            entry.setdefault(text.token(other, strings_of[other]), max(other_lp, MIN_LOGPROB))
        top.append(entry)
    return CompletionLogprobs(
        tokens=[text.token(token, s) for token, s in zip(tokens.token_ids, strings, strict=True)],
        token_logprobs=[max(lp, MIN_LOGPROB) for lp in tokens.logprobs],
        top_logprobs=top,
        text_offset=offsets,
    )


def chat_logprobs(
    tokens: TokenDelta, k: int, strings: Sequence[str], strings_of: dict[int, str], text: ChoiceText
) -> ChatLogprobs:
    """Chat's logprobs: each sampled token with the top-k at its step."""
    content = []
    for token, s, lp, step in zip(tokens.token_ids, strings, tokens.logprobs, _top(tokens, k), strict=True):
        top = []
        for other, other_lp in step:
            name = text.token(other, strings_of[other])
            top.append(ChatTopLogprob(token=name, logprob=max(other_lp, MIN_LOGPROB), bytes=_bytes(name)))
        name = text.token(token, s)
        content.append(
            ChatLogprob(token=name, logprob=max(lp, MIN_LOGPROB), bytes=_bytes(name), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def top_token_ids(tokens: TokenDelta, k: int) -> set[int]:
    """Every token id the top-k of `tokens` names (to decode them once)."""
    return {token for step in _top(tokens, k) for token, _ in step}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


class TextStream:
    """A streamed choice's text as its final tokens come: each `feed` returns what may be sent now,
    such that everything sent is a prefix of the choice's text however it ends (`ChoiceText`).

    Held back: a token that would end the choice (EOS, a stop token: left out of the text unless
    include_stop_str_in_output), an incomplete UTF-8 character (decoded as U+FFFD until the rest
    comes), the last (longest stop string - 1) characters (a stop string may begin there), and
    anything from a complete stop string on (the text is cut there). Decoding is incremental, as
    vLLM's and TGI's streams do it: the tokens since the last piece that decoded whole, in the
    window of the piece before (so tokenizers that strip a leading space see the same context)."""

    def __init__(self, text: ChoiceText, tokenizer) -> None:
        self.choice = text
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        """The decoded text of `ids` so far."""
        self.sent = 0
        """Characters of `text` sent."""
        self._prefix = self._read = 0
        self._hold = max((len(s) for s in text.stops), default=1) - 1

    def feed(self, token_ids: Sequence[int]) -> str:
        choice = self.choice
        keep_end = choice.include_stop_str_in_output
        self.ids.extend(t for t in token_ids if keep_end or not choice.ends_choice(t))
        if len(self.ids) > self._read:
            skip, spaces = choice.skip_special_tokens, choice.spaces_between_special_tokens
            before = decode(self.tokenizer, self.ids[self._prefix : self._read], skip, spaces)
            now = decode(self.tokenizer, self.ids[self._prefix :], skip, spaces)
            if len(now) > len(before) and not now.endswith("\ufffd"):
                self.text += now[len(before) :]
                self._prefix, self._read = self._read, len(self.ids)
        limit = len(self.text) - self._hold
        found = _first_stop(self.text, choice.stops)
        if found is not None:  # the choice ends here: nothing after it is text
            at, stop = found
            limit = at + len(stop) if choice.include_stop_str_in_output else at
        if limit <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : limit], limit
        return out

    def rest(self, final: str) -> str:
        """The choice ended with text `final`: what was not sent yet."""
        if not final.startswith(self.text[: self.sent]):  # a tokenizer whose decoding is not prefix-stable
            log.error("streamed text %r is no prefix of the choice's text %r", self.text[: self.sent], final)
        return final[self.sent :]
