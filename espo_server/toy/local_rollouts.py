"""Rollouts of the toy task in this process: the server's stop rule on a torch sampler, for the
experiments that need hundreds of runs (bench/reproduce.py, bench/ceiling.py).

`LocalClient` answers the calls a learner makes to the server (`rollouts`, `info`, `load_weights`,
`load_critic_weights`) with the same protocol models and the same maths:

* the policy samples with torch; a token's raw log-probability is `log_softmax` of its logits, what
  vLLM's `raw_logprobs` are (to ~1e-6, checked in the design notes), so the regret is the server's;
* every sample runs the tracker of `espo_client.stop_rule` that the server runs, with the call's
  frozen state; a stopped sample keeps tokens 0..t and gets `r_fail`; `eos` samples get the toy
  verifier's reward when the prompt carries its answer; `state_after` is `update_state` of the call;
* the state is the learner's (sent with every call; none sent: a fresh one);
* the critic (a `LlamaForTokenClassification`, V(s_t) read at the last position of
  prompt + response[:t]) answers a query `critic_latency` tokens after it was asked: the sample goes
  on meanwhile and, if the answer stops it, those tokens are discarded and counted
  (`discarded_tokens`), as in the server's race, but after a fixed delay instead of whenever the
  answer comes. A sample that ends while a query is pending still gets the decision;
* `critic_prefix_tokens` sums the prefixes asked about; `critic_tokens` counts what a prefix cache
  leaves to compute (each query of a sample extends its previous one: the new tokens only).

What it does not do: HTTP, batches spanning calls, runs, carried samples, shadow traces of
entropy. One process, deterministic for a seed (torch's generator; one thread gives the same
numbers every time on one machine).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from espo_client import protocol
from espo_client.stop_rule import (
    BatchStats,
    EspoParams,
    EspoState,
    StopRule,
    TrajectoryTracker,
    draw_random_stop,
    make_tracker,
    tokens_saved,
    update_state,
)
from espo_server.tiny_model import EOS_ID, PAD_ID
from espo_server.toy.task import decode, verify
from espo_server.toy.train import decode_step

__all__ = ["LocalClient", "critic_values_at", "sample_continuations"]


def _left_pad(prefixes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (padding changes nothing)."""
    width = max(len(p) for p in prefixes)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + list(p) for p in prefixes])
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):
        attn[i, width - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos


@torch.no_grad()
def critic_values_at(critic, prefixes: Sequence[Sequence[int]], chunk: int = 512) -> list[float]:
    """V of each whole prefix: the critic's output at its last token."""
    out: list[float] = []
    for start in range(0, len(prefixes), chunk):
        ids, attn, pos = _left_pad(prefixes[start : start + chunk])
        logits = critic(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1, 0]
        out.extend(logits.float().tolist())
    return out


@torch.no_grad()
def sample_continuations(
    policy,
    prefixes: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int] | int,
    generator: torch.Generator,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> list[list[int]]:
    """One continuation of each prefix (token ids, ending with EOS unless cut at its budget)."""
    budgets = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = []
    for start in range(0, len(prefixes), chunk):
        part = prefixes[start : start + chunk]
        budget = torch.tensor(budgets[start : start + chunk])
        ids, attn, pos = _left_pad(part)
        done = budget <= 0
        tokens: list[torch.Tensor] = []
        past = None
        for step in range(int(budget.max().item()) if len(part) else 0):
            past, _, nxt = decode_step(policy, ids, attn, pos, past, temperature, generator)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            tokens.append(nxt)
            done |= (nxt == EOS_ID) | (budget <= step + 1)
            if bool(done.all()):
                break
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones_like(ids)], 1)
        rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in part]
        for row, b in zip(rows, budget.tolist(), strict=True):
            row = row[:b]
            out.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


@dataclass
class _Live:
    """One sample while it generates."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    answer: str | None
    tracker: TrajectoryTracker
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pending: tuple[int, int] | None = None  # (step asked about, step at which the answer arrives)
    stop_step: int | None = None
    shadow_stop_step: int | None = None
    finish: str | None = None  # eos | length
    critic_calls: int = 0
    critic_prefix_tokens: int = 0
    critic_tokens: int = 0
    cached: int = 0  # prefix tokens the critic already computed for this sample

    @property
    def running(self) -> bool:
        return self.finish is None and self.stop_step is None


class LocalClient:
    """The calls of `espo_client.EspoClient` that a learner makes, served in this process.

    policy, critic: HF models (a `LlamaForCausalLM`, a `LlamaForTokenClassification` with one
    regression label); `load_weights` / `load_critic_weights` read a saved directory into them.
    """

    def __init__(
        self,
        policy,
        critic,
        params: EspoParams | None = None,
        *,
        critic_latency: int = 0,
        chunk: int = 512,
        model_name: str = "espo-toy (local)",
    ) -> None:
        self.policy, self.critic = policy, critic
        self.params = params or EspoParams()
        self.critic_latency = critic_latency
        self.chunk = chunk
        self.model_name = model_name
        self.policy_version, self.critic_version = 0, 0

    # --- the client calls a learner makes

    def wait_ready(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None

    def info(self) -> Any:
        return _Info(
            model=self.model_name,
            policy_version=self.policy_version,
            critic="local",
            critic_version=self.critic_version,
            rule_defaults=dataclasses.asdict(self.params),
        )

    def load_weights(self, path: str, version: int | None = None) -> protocol.WeightsResponse:
        _load_into(self.policy, path)
        self.policy_version = self.policy_version + 1 if version is None else version
        return protocol.WeightsResponse(policy_version=self.policy_version, load_time_s=0.0)

    def load_critic_weights(self, path: str, version: int | None = None) -> Any:
        _load_into(self.critic, path)
        self.critic_version = self.critic_version + 1 if version is None else version
        return _CriticVersion(critic_version=self.critic_version)

    def set_policy_weights(self, state_dict: dict, version: int) -> int:
        """A push in memory (no directory): the weights are copied, the learner keeps its own."""
        self.policy.load_state_dict(state_dict)
        self.policy_version = version
        return version

    def set_critic_weights(self, state_dict: dict, version: int) -> int:
        self.critic.load_state_dict(state_dict)
        self.critic_version = version
        return version

    def rollouts(
        self,
        prompts: Sequence[dict | protocol.Prompt],
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        stop_rule: str = "espo",
        rule_params: protocol.RuleParams | dict | None = None,
        state: EspoState | None = None,
        shadow: bool = False,
        include: Sequence[str] = (),
        update_state: bool = True,
        **unsupported: Any,
    ) -> protocol.RolloutResponse:
        if unsupported:
            raise TypeError(f"LocalClient.rollouts does not take {sorted(unsupported)}")
        if isinstance(rule_params, dict):
            rule_params = protocol.RuleParams.model_validate(rule_params)
        params = rule_params.apply(self.params) if rule_params is not None else self.params
        state = state if state is not None else EspoState.fresh(params)  # no server-owned state here
        rule = StopRule(stop_rule)
        prompts = [
            p if isinstance(p, protocol.Prompt) else protocol.Prompt.model_validate(p) for p in prompts
        ]
        seed = 0 if seed is None else seed
        rng = np.random.default_rng(seed)
        lives = []
        for i, p in enumerate(prompts):
            assert p.token_ids is not None, "LocalClient takes token ids"
            for j in range(n):
                stop_at = draw_random_stop(rng, params, max_tokens) if rule is StopRule.RANDOM else None
                tracker = make_tracker(rule, state, params, random_stop_at=stop_at)
                lives.append(_Live(i, j, list(p.token_ids), p.answer, tracker))
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(lives), self.chunk):
            self._generate(lives[start : start + self.chunk], max_tokens, temperature, shadow, generator)
        return self._response(lives, rule, params, state, shadow, set(include), update_state, max_tokens)

    # --- generation

    @torch.no_grad()
    def _generate(
        self,
        lives: list[_Live],
        max_tokens: int,
        temperature: float,
        shadow: bool,
        generator: torch.Generator,
    ) -> None:
        ids, attn, pos = _left_pad([live.prompt for live in lives])
        past = None
        for step in range(max_tokens):
            past, logits, nxt = decode_step(self.policy, ids, attn, pos, past, temperature, generator)
            raw = torch.log_softmax(logits, -1)
            chosen = raw.gather(-1, nxt[:, None])[:, 0].tolist()
            top = raw.max(-1).values.tolist()
            tokens = nxt.tolist()
            for i, live in enumerate(lives):
                if not live.running:
                    continue
                live.tokens.append(tokens[i])
                live.logprobs.append(chosen[i])
                decision = live.tracker.step(chosen[i], top[i])  # decides once, then only records
                if decision.stop:
                    self._decided(live, live.tracker.t, shadow)
                elif decision.query_value:
                    live.pending = (live.tracker.t, live.tracker.t + self.critic_latency)
                if live.stop_step is None and tokens[i] == EOS_ID:
                    live.finish = "eos"
                elif live.stop_step is None and len(live.tokens) >= max_tokens:
                    live.finish = "length"
            self._answer_due(lives, step, shadow)
            if not any(live.running for live in lives):
                break
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones_like(ids)], 1)
        self._answer_due(lives, None, shadow)  # streams that ended with a query pending

    def _answer_due(self, lives: list[_Live], step: int | None, shadow: bool) -> None:
        """Answer the pending queries whose time has come (all of them when `step` is None or their
        sample has ended), in one critic batch."""
        due = [
            live
            for live in lives
            if live.pending is not None
            and (step is None or live.finish is not None or live.pending[1] <= step)
        ]
        if not due:
            return
        prefixes = [live.prompt + live.tokens[: live.pending[0]] for live in due]
        values = critic_values_at(self.critic, prefixes)
        for live, prefix, value in zip(due, prefixes, values, strict=True):
            t = live.pending[0]
            live.pending = None
            live.critic_calls += 1
            live.critic_prefix_tokens += len(prefix)
            live.critic_tokens += max(0, len(prefix) - live.cached)
            live.cached = max(live.cached, len(prefix))
            if live.tracker.resolve(t, value):
                self._decided(live, t, shadow)

    @staticmethod
    def _decided(live: _Live, t: int, shadow: bool) -> None:
        if shadow:
            live.shadow_stop_step = t
        else:
            live.stop_step = t

    # --- the response

    def _response(
        self,
        lives: list[_Live],
        rule: StopRule,
        params: EspoParams,
        state: EspoState,
        shadow: bool,
        include: set[str],
        fold: bool,
        max_tokens: int,
    ) -> protocol.RolloutResponse:
        trajectories, stats = [], BatchStats()
        discarded = prompt_tokens = 0
        for live in lives:
            full = len(live.tokens)
            if live.stop_step is not None:
                kept, end_reason, reward = live.stop_step + 1, "espo_stop", params.r_fail
            else:
                kept, end_reason, reward = full, live.finish or "length", None
                if end_reason == "eos" and live.answer is not None:
                    text, finished = decode(live.tokens)
                    reward = verify("", text, live.answer, finished=finished).reward
            discarded += full - kept
            prompt_tokens += len(live.prompt)
            tr = live.tracker
            traces = None
            if include:
                traces = protocol.Traces(
                    regret=tr.g[:kept] if "regret" in include else None,
                    z=tr.z[:kept] if "z" in include else None,
                    values=[tr.values.get(t) for t in range(kept)] if "values" in include else None,
                )
            trajectories.append(
                protocol.Trajectory(
                    prompt_index=live.prompt_index,
                    sample_index=live.sample_index,
                    token_ids=live.tokens[:kept],
                    logprobs=live.logprobs[:kept],
                    end_reason=end_reason,
                    stop_step=live.stop_step,
                    reward=reward,
                    shadow_stop_step=live.shadow_stop_step,
                    policy_version=self.policy_version,
                    discarded_tokens=full - kept,
                    critic_version=self.critic_version if live.critic_calls else None,
                    traces=traces,
                )
            )
            rule_stopped = live.stop_step is not None or live.shadow_stop_step is not None
            stats.add_trajectory(tr.g[:kept], rule_stopped if rule.steers_beta else None)
        stopped = [t for t in trajectories if t.end_reason == "espo_stop"]
        unstopped = [len(t.token_ids) for t in trajectories if t.end_reason != "espo_stop"]
        estimate, upper = tokens_saved([t.stop_step for t in stopped], unstopped, max_tokens)
        usage = protocol.Usage(
            prompt_tokens=prompt_tokens,
            generated_tokens=sum(len(t.token_ids) for t in trajectories),
            discarded_tokens=discarded,
            trajectories=len(trajectories),
            stopped=len(stopped),
            shadow_stopped=sum(live.shadow_stop_step is not None for live in lives),
            tokens_saved_estimate=estimate,
            tokens_saved_upper_bound=upper,
            tokens_saved_shadow=sum(
                max(0, len(t.token_ids) - (t.shadow_stop_step + 1))
                for t in trajectories
                if t.shadow_stop_step is not None
            ),
            critic_calls=sum(live.critic_calls for live in lives),
            critic_tokens=sum(live.critic_tokens for live in lives),
            critic_prefix_tokens=sum(live.critic_prefix_tokens for live in lives),
            regret_tokens=stats.tokens,
            regret_sum=stats.g_sum,
            regret_sumsq=stats.g_sumsq,
        )
        return protocol.RolloutResponse(
            request_id=uuid.uuid4().hex,
            trajectories=trajectories,
            usage=usage,
            stop_rule=rule,
            shadow=shadow,
            rule_params=dataclasses.asdict(params),
            state_used=state,
            state_after=update_state(state, stats, params) if fold else None,
            policy_version=self.policy_version,
        )


@dataclass(frozen=True)
class _Info:
    model: str
    policy_version: int
    critic: str
    critic_version: int
    rule_defaults: dict


@dataclass(frozen=True)
class _CriticVersion:
    critic_version: int


def _load_into(model, path: str) -> None:
    """Read a saved HF directory's safetensors into `model` (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state)
